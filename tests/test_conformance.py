"""The whole sampling pipeline against a torch rewrite of the official HoloCine one (issue 17.7).

Ours: tiny random two-expert weights written with `save_official` (high_noise_model/,
low_noise_model/) -> `holocine-jax import --format official --expert high|low` -> `run_sample`
with both checkpoints. Reference, rewritten here from the official behaviour (DESIGN §3, §11;
read in HoloCine's WanVideoHoloCinePipeline, WanPrompter, FlowMatchScheduler and
model_fn_wan_video): diffusers' WanTransformer3DModel per expert, loaded from the same official
files through diffusers' own converter, with attention processors doing the official sparse
self-attention and window cross-attention; transformers' UMT5EncoderModel and AutoTokenizer.

Rules the reference spells out: FlowMatchScheduler Euler (shift 5, sigma_min 0, extra one step,
x += v (sigma_next - sigma)); CFG 5 with the negative prompt unmasked (no text windows); the
switch to the low-noise expert once t < 875; cuts snapped to 4t+1 (`enforce_4t_plus_1`, Python
rounding) then latent (p - 1) // 4 + 1; the prompter's ftfy + whitespace cleaning, spans on the
prompt as given, windows [first, last + 1] inclusive (one past the end) and the padding visible,
-1e4 elsewhere; every shot's keys = its own tokens ++ the first-frame tokens of all shots.

Shared on purpose: the tokenizer.json, the weight files, and the initial noise
(`jax.random.normal(jax.random.key(seed))`, where the official draws from a torch generator).
The text encoder is a tiny random UMT5 (the conformance is of the DiT sampling loop, windows and
cuts, not of UMT5-XXL); text_len is the config's 128 (official 512); the reference runs float64,
ours float32 (official bf16).
"""
import html
import json
import re
import types

import ftfy
import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from attention.test_reference import dense, official_sparse, rel_err
from conftest import tiny_config
from convert.test_roundtrip import random_model
from holocine_jax import cli, prompts
from holocine_jax.checkpoint import load_config_json
from holocine_jax.convert import save_official
from holocine_jax.sample.run import FilmRequest, run_sample
from holocine_jax.text import load_tokenizer, tokenize

FRAMES, CUTS, SEED, STEPS, CFG = 33, (11, 23), 3, 4, 5.0  # 11 -> 9 (2.5 rounds to 2), 23 -> 25
TOL = 1e-4  # relative (max abs error / max abs value), float32 against float64
PROMPT = ("[global caption] A red circle walks into a kitchen; [character1]’s glass is empty. "
          "This scene contains 3 shots. [per shot caption] Wide shot: [character1] enters from the "
          "left. [shot cut] Close-up: [character1]’s hand pours water into the glass. [shot cut] "
          "Wide shot: the circle waits beside the full glass.")
NEGATIVE = "blurry, static, low quality, [character2]’s extra fingers"
CORPUS = [  # straight quotes only: the tokenizer knows ' but not ’
    "[global caption] A red circle walks into a kitchen; [character1]'s glass is empty.",
    "This scene contains 3 shots. [per shot caption] Wide shot: [character1] enters from the left.",
    "[shot cut] Close-up: [character1]'s hand pours water into the glass. [shot cut] Wide shot:",
    "the circle waits beside the full glass.",
    "Blurry, static, low quality, [character2]'s extra fingers.",
]
CONFIG_FILE = f'''from configs import tiny


def get_config():  # the tiny config as a two-expert (A14B-style) pair
    c = tiny.get_config()
    c.experts.names = ("high", "low")
    c.experts.boundary = 0.875
    c.sample.update(num_steps={STEPS}, shift=5.0, guidance_scale={CFG},
                    negative_prompt={NEGATIVE!r})
    return c
'''


def write_text_stack(path):
    """A sentencepiece-style Unigram tokenizer.json (pieces: CORPUS's words, each with its
    leading "▁", and its characters, not ’) and a random transformers UMT5 (d_model = the tiny
    DiT's text_dim) in one directory; returns the UMT5 in float64."""
    words = sorted({w for line in CORPUS for w in line.split()})
    chars = sorted({c for line in CORPUS for c in line if not c.isspace()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0)]
    pieces += [("▁" + w, -1.0) for w in words] + [(c, -10.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(str(path))
    config = transformers.UMT5Config(vocab_size=tok.get_vocab_size(), d_kv=8, d_ff=48,
                                     d_model=tiny_config().model.text_dim, num_layers=2,
                                     num_heads=4, dropout_rate=0.0)
    torch.manual_seed(0)
    encoder = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            p.copy_(torch.randn_like(p) * 0.4 + (1.0 if "layer_norm" in name else 0.0))
    encoder.save_pretrained(str(path))
    return encoder.double()


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our pipeline end to end (latents [F, h, w, z], film.json paths) and what it read: the
    official-layout release root, the text directory (tokenizer and the float64 UMT5)."""
    root = tmp_path_factory.mktemp("conformance")
    encoder = write_text_stack(root / "text")
    for expert, seed in (("high", 0), ("low", 7)):
        save_official(random_model(tiny_config(), seed), str(root / "release"), expert=expert)
    (root / "experts.py").write_text(CONFIG_FILE, encoding="utf-8")
    ckpts = [str(root / f"ckpt_{e}") for e in ("high", "low")]
    for expert, ckpt in zip(("high", "low"), ckpts):
        assert cli.main(["import", "--config", str(root / "experts.py"), "--format", "official",
                         "--src", str(root / "release"), "--expert", expert, "--out", ckpt,
                         f"--config.text.path={root / 'text'}"]) == 0
        assert load_config_json(ckpt).expert == expert
    config = load_config_json(ckpts[0])  # as `holocine-jax sample` reads it
    film = FilmRequest(PROMPT, cuts=CUTS, num_frames=FRAMES, seed=SEED)
    paths = run_sample(config, ckpts, [film], str(root / "film"), progress=False,
                       save_latents=True)[0]
    return types.SimpleNamespace(root=root, config=config, encoder=encoder, paths=paths,
                                 latents=np.load(paths["latents"]),
                                 tokenizer=transformers.AutoTokenizer.from_pretrained(
                                     str(root / "text"), use_fast=True))


# ---- the official prompter, cuts and scheduler -------------------------------------------------

def official_clean(text, fix_text=ftfy.fix_text):
    """The prompter's basic_clean (ftfy, HTML unescaped twice, strip) then whitespace_clean."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(fix_text(text))).strip()).strip()


def official_spans(prompt):
    """[(span id, start, end)]: -1 from `[global caption]` to `[per shot caption]`; shot k from
    the previous span's end (shot 0: `[per shot caption]`) through the end of its `[shot cut]`;
    the last shot to the end of the prompt."""
    g, p = prompt.find("[global caption]"), prompt.find("[per shot caption]")
    spans = [(-1, g, p if p >= 0 else len(prompt))] if g >= 0 else []
    if p < 0:
        return spans
    start, shot = p, 0
    for m in re.finditer(r"\[shot cut\]", prompt):
        spans.append((shot, start, m.end()))
        start, shot = m.end(), shot + 1
    if start < len(prompt):
        spans.append((shot, start, len(prompt)))
    return spans


def official_prompter(prompt, tokenizer, encoder, text_len, fix_text=ftfy.fix_text):
    """encode_prompt: (states float64 [1, text_len, D] zeroed past the length, ids [text_len],
    positions {"global": [a, b], "shots": [[a, b], ...]} with b = last token + 1). The spans are
    found on `prompt` as given, the tokens on the cleaned prompt (as the official code does)."""
    enc = tokenizer([official_clean(prompt, fix_text)], padding="max_length", truncation=True,
                    max_length=text_len, return_offsets_mapping=True, return_tensors="pt")
    owner = []
    for a, b in enc["offset_mapping"][0].tolist():
        hits = [sid for sid, s, e in official_spans(prompt) if a != b and not (b <= s or a >= e)]
        owner.append(hits[0] if hits else -2)
    owner = np.array(owner)
    ranges = {sid: [int(np.flatnonzero(owner == sid)[0]), int(np.flatnonzero(owner == sid)[-1]) + 1]
              for sid in sorted(set(owner) - {-2})}
    positions = {"global": ranges.pop(-1, None), "shots": [ranges[k] for k in sorted(ranges)]}
    with torch.no_grad():
        states = encoder(input_ids=enc["input_ids"],
                         attention_mask=enc["attention_mask"]).last_hidden_state
    states[:, int(enc["attention_mask"].sum()):] = 0
    return states, enc["input_ids"][0].numpy(), positions


def official_latent_cuts(cut_frames, num_frames, snap=True):
    """Mode 2 of the inference script (enforce_4t_plus_1 per cut), then the ShotEmbedder:
    latent shot bounds [0, ..., F]."""
    if snap:
        cut_frames = [4 * round((p - 1) / 4) + 1 for p in cut_frames]
    f = (num_frames - 1) // 4 + 1
    starts = {0} | {(p - 1) // 4 + 1 for p in cut_frames if p > 0 and (p - 1) // 4 + 1 < f}
    return sorted(starts) + [f]


def official_text_bias(positions, bounds, tokens_per_frame, text_len, one_past_end=1):
    """model_fn_wan_video's mask as an additive bias [L, text_len]: global and own-shot windows
    [a, b + one_past_end), everything from max(b) + 1 on visible, -1e4 elsewhere."""
    (g0, g1), shots = positions["global"], positions["shots"]
    allow = torch.zeros(len(shots), text_len, dtype=torch.bool)
    for sid, (s0, s1) in enumerate(shots):
        allow[sid, s0:s1 + one_past_end] = True
    allow[:, g0:g1 + one_past_end] = True
    allow[:, max([g1] + [s1 for _, s1 in shots]) + 1:] = True
    lengths = torch.tensor(np.diff(bounds))
    frame_shot = torch.repeat_interleave(torch.arange(len(bounds) - 1), lengths)
    return torch.where(allow[frame_shot.repeat_interleave(tokens_per_frame)], 0.0, -1e4).double()


def official_sigmas(steps, shift=5.0):
    """FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(steps)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return shift * s / (1 + (shift - 1) * s)


# ---- the official DiT: diffusers' model with the official attention -----------------------------

def rope(x, cos, sin):
    """diffusers' Wan RoPE on x [B, L, H, D] (interleaved pairs)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)


class OfficialAttention:
    """Attention processor: self-attention = `official_sparse` over `film["cuts"]` (token cuts,
    `film["per_g"]` first-frame tokens per shot); cross-attention = softmax with `film["bias"]`
    ([L, Lt] additive, None: plain)."""

    def __init__(self, film, cross):
        self.film, self.cross = film, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = rope(q, *rotary_emb), rope(k, *rotary_emb)
        f = self.film
        out = [dense(q[b], k[b], v[b], f["bias"]) if self.cross else
               official_sparse(q[b], k[b], v[b], f["cuts"], f["per_g"]) for b in range(len(q))]
        return attn.to_out[0](torch.stack(out).flatten(2))


def official_dit(folder, film):
    """WanTransformer3DModel (float64) from an official folder through diffusers' converter."""
    c = json.loads((folder / "config.json").read_text())
    model = WanTransformer3DModel(
        patch_size=tuple(c["patch_size"]), num_attention_heads=c["num_heads"],
        attention_head_dim=c["dim"] // c["num_heads"], in_channels=c["in_dim"],
        out_channels=c["out_dim"], text_dim=c["text_dim"], freq_dim=c["freq_dim"],
        ffn_dim=c["ffn_dim"], num_layers=c["num_layers"], cross_attn_norm=c["cross_attn_norm"],
        eps=c["eps"])
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    model.load_state_dict(convert_wan_transformer_to_diffusers(tensors), strict=True)
    for block in model.blocks:
        block.attn1.set_processor(OfficialAttention(film, cross=False))
        block.attn2.set_processor(OfficialAttention(film, cross=True))
    return model.double().eval()


def official_latents(ours, *, snap=True, fix_text=ftfy.fix_text, one_past_end=1, switch=True):
    """WanVideoHoloCinePipeline.__call__ (Mode 2: raw prompt + cuts): final latents [F, h, w, z]."""
    config, film = ours.config, {}
    experts = [official_dit(ours.root / "release" / f"{e}_noise_model", film)
               for e in ("high", "low")]
    lt, (ph, pw) = config.model.text_len, config.model.patch_size[1:]
    posi, _, positions = official_prompter(PROMPT, ours.tokenizer, ours.encoder, lt, fix_text)
    nega = official_prompter(config.sample.negative_prompt, ours.tokenizer, ours.encoder, lt,
                             fix_text)[0]
    f, h, w = (FRAMES - 1) // 4 + 1, config.video.height // 8, config.video.width // 8  # VAE 8x
    film["per_g"] = (h // ph) * (w // pw)
    bounds = official_latent_cuts(CUTS, FRAMES, snap)
    film["cuts"] = [b * film["per_g"] for b in bounds]
    bias = official_text_bias(positions, bounds, film["per_g"], lt, one_past_end)
    noise = jax.random.normal(jax.random.key(SEED), (f, h, w, config.model.in_channels))
    x = torch.from_numpy(np.array(noise)).double().permute(3, 0, 1, 2)[None]
    sigmas, dit = official_sigmas(STEPS), experts[0]
    with torch.no_grad():
        for i, sigma in enumerate(sigmas):
            t = 1000 * sigma
            if switch and t < 0.875 * 1000:
                dit = experts[1]
            film["bias"] = bias
            v_posi = dit(x, t[None], posi, return_dict=False)[0]
            film["bias"] = None  # the negative prompt: no windows
            v_nega = dit(x, t[None], nega, return_dict=False)[0]
            v = v_nega + CFG * (v_posi - v_nega)
            x = x + v * ((sigmas[i + 1] if i + 1 < len(sigmas) else 0.0) - sigma)
    return x[0].permute(1, 2, 3, 0).numpy()


# ---- the tests ----------------------------------------------------------------------------------

def test_cuts_snap_as_official(ours):
    info = json.loads(open(ours.paths["json"]).read())
    bounds = official_latent_cuts(CUTS, FRAMES)
    assert info["latent_cuts"] == bounds[1:-1] == [3, 7]
    assert info["cut_frames"] == [9, 25]


def test_token_ids_and_windows_match_official_prompter(ours):
    """Same tokenizer file, loaded ours and the official way: ids, windows, padding start."""
    tok = load_tokenizer(str(ours.root / "text"))
    lt = ours.config.model.text_len
    _, ids, positions = official_prompter(PROMPT, ours.tokenizer, ours.encoder, lt)
    np.testing.assert_array_equal(tokenize(tok, [PROMPT], lt)[0][0], ids)
    assert tok.token_to_id("<unk>") not in ids  # ftfy made ’ a known '
    windows = prompts.text_windows(PROMPT, tok, num_shots=3, text_len=lt)
    official = [positions["global"]] + positions["shots"]
    assert windows.windows.tolist() == [[a, b + 1] for a, b in official]  # one past the end
    assert windows.pad_start == max(b for _, b in official) + 1


@pytest.fixture(scope="module")
def official(ours):
    return official_latents(ours)


def test_final_latents_match_official_loop(ours, official):
    assert ours.latents.shape == official.shape == (9, 8, 8, 16)
    assert rel_err(ours.latents, official) <= TOL


@pytest.mark.parametrize("rule", ["snap", "fix_text", "one_past_end", "switch"])
def test_each_rule_moves_the_latents(ours, official, rule):
    """Without any one of the rules the official latents move far past the tolerance, so the
    comparison above detects an implementation that drops it."""
    off = dict(snap=False, fix_text=lambda t: t, one_past_end=0, switch=False)[rule]
    assert rel_err(official_latents(ours, **{rule: off}), official) > 10 * TOL
