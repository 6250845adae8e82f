"""The laptop config: a 4-layer dim-128 DiT on 64x64 films of the synthetic world, CPU, float32.

Wan's latent geometry (4x8x8, 2x2 patches) is kept: a 64x64 frame is 4x4 tokens. The world's
character is drawn large (world/render.py RADIUS: 0.36 of a wide frame's height) so that it spans
about 1.5 tokens and every shot's summary frame shows it; the room fills the rest."""
from configs import base


def get_config():
    c = base.base_config("tiny", vae="2.1", sampling=dict(
        num_steps=20, shift=5.0, guidance_scale=3.0, num_frames=33, fps=8, height=64, width=64))
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.model.text_len = 128  # a 5-shot synthetic-world prompt is ~110 word-level tokens
    c.shots.max_shots = 4
    c.attention.block_q = 32
    c.attention.block_kv = 32
    c.text.dtype = c.text.param_dtype = "float32"  # the seeded UMT5 (config.text, path "")
    # Analytic DCT autoencoder (vae/dct.py) with Wan 2.1's latent geometry (z16, 4x8x8); latent
    # statistics measured on synthetic-world films (seeds 0-5, 64x64, 33 frames).
    c.vae.kind = "dct"
    c.vae.latents_mean = (6.05, 0.01, 1.33, 1.24, -0.05, 0.0, -0.11, -0.2,
                          0.1, 0.83, 0.0, 0.03, -0.4, -0.09, -0.01, 0.02)
    c.vae.latents_std = (7.77, 0.39, 2.1, 2.97, 0.69, 0.97, 0.73, 1.01,
                         2.09, 3.1, 1.55, 1.01, 1.58, 1.12, 0.71, 0.6)
    # The demo's training run (DESIGN §15): 1500 steps, ~6.5 minutes on 2 CPU cores from the
    # `data encode` cache (3.8 steps/s with validation and checkpoints).
    # (dim 64 / 2 layers underfits: loss ~1.0 after 1200 steps and blocky films.)
    c.train.update(steps=1500, batch_size=8, learning_rate=1e-3, warmup_steps=50, log_every=50,
                   checkpoint_every=500, keep_checkpoints=2)
    # Caption dropout: 10% of the films train on the empty prompt, so the model has an
    # unconditional branch and samples with classifier-free guidance 3 against "" (the negative
    # prompt it was trained on; Wan's long negative prompt means nothing to the toy encoder).
    c.train.caption_dropout = 0.1
    c.sample.negative_prompt = ""
    # A validation film (the demo's held-out film, 10 steps) in TensorBoard every 500 steps.
    c.train.update(validate_every=500, validation_films=1)
    return c
