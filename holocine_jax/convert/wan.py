"""Load and save WanDiT weights in diffusers and official Wan layouts (DESIGN §13).

    model = load_diffusers("Wan2.1-T2V-1.3B-Diffusers/transformer")
    model = load_official("Wan2.2-T2V-A14B", expert="low")       # low_noise_model/
    save_diffusers(model, "out/")                                 # loads with from_pretrained
    save_official(model, "out/", expert="high")                   # out/high_noise_model/

Writes go to a temporary sibling directory that is renamed into place when complete, so an
interrupted or failed export never leaves a half-written output directory.
"""
from __future__ import annotations

import json
import os

from flax import nnx

from holocine_jax.config import CONFIG_NAMES, load_config
from holocine_jax.convert import names as N
from holocine_jax.convert.layout import check_tensors, fill_params, tensor_producer, torch_layout
from holocine_jax.convert.safetensors_io import SafetensorsReader, write_sharded
from holocine_jax.files import atomic_directory
from holocine_jax.model import WanDiT

SUBFOLDERS = {"diffusers": {"high": "transformer", "low": "transformer_2"},
              "official": {"high": "high_noise_model", "low": "low_noise_model"}}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
ARCH_KEYS = ("patch_size", "in_channels", "out_channels", "dim", "ffn_dim", "num_heads",
             "num_layers", "freq_dim", "text_dim", "cross_attn_norm", "eps")


def diffusers_config(m) -> dict:
    """`config.json` of diffusers' WanTransformer3DModel for our `config.model`."""
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(m.patch_size),
            "num_attention_heads": m.num_heads, "attention_head_dim": m.dim // m.num_heads,
            "in_channels": m.in_channels, "out_channels": m.out_channels, "text_dim": m.text_dim,
            "freq_dim": m.freq_dim, "ffn_dim": m.ffn_dim, "num_layers": m.num_layers,
            "cross_attn_norm": m.cross_attn_norm, "qk_norm": "rms_norm_across_heads", "eps": m.eps,
            "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
            "pos_embed_seq_len": None}


def official_config(m) -> dict:
    """`config.json` of the official `WanModel` for our `config.model`."""
    return {"_class_name": "WanModel", "model_type": "ti2v" if m.in_channels == 48 else "t2v",
            "patch_size": list(m.patch_size), "text_len": m.text_len, "in_dim": m.in_channels,
            "dim": m.dim, "ffn_dim": m.ffn_dim, "freq_dim": m.freq_dim, "text_dim": m.text_dim,
            "out_dim": m.out_channels, "num_heads": m.num_heads, "num_layers": m.num_layers,
            "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": m.cross_attn_norm,
            "eps": m.eps}


def arch_from_diffusers(c: dict, source: str) -> dict:
    if c.get("image_dim") or c.get("added_kv_proj_dim") or c.get("pos_embed_seq_len"):
        raise ValueError(f"{source}: image-conditioned (I2V) Wan transformers are not supported "
                         f"(image_dim={c.get('image_dim')}, added_kv_proj_dim={c.get('added_kv_proj_dim')})")
    if c.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"{source}: qk_norm={c['qk_norm']!r} is not supported (rms_norm_across_heads)")
    return dict(patch_size=tuple(c["patch_size"]), in_channels=c["in_channels"],
                out_channels=c.get("out_channels") or c["in_channels"],
                dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c["ffn_dim"],
                num_heads=c["num_attention_heads"], num_layers=c["num_layers"], freq_dim=c["freq_dim"],
                text_dim=c["text_dim"], cross_attn_norm=c["cross_attn_norm"], eps=c["eps"])


def arch_from_official(c: dict, source: str) -> dict:
    if c.get("model_type", "t2v") not in ("t2v", "ti2v"):
        raise ValueError(f"{source}: model_type={c['model_type']!r} is not supported (t2v, ti2v)")
    return dict(patch_size=tuple(c["patch_size"]), in_channels=c["in_dim"],
                out_channels=c["out_dim"], dim=c["dim"], ffn_dim=c["ffn_dim"], num_heads=c["num_heads"],
                num_layers=c["num_layers"], freq_dim=c["freq_dim"], text_dim=c["text_dim"],
                cross_attn_norm=c["cross_attn_norm"], eps=c["eps"])


def config_for(arch: dict, config=None):
    """`config` (or the named config with this architecture) with `config.model` set to `arch`."""
    if config is None:
        matches = [n for n in CONFIG_NAMES
                   if all(load_config(n).model[k] == v for k, v in arch.items() if k != "patch_size")]
        config = load_config(matches[0] if matches else "wan21_t2v_1_3b")
    config = config.copy_and_resolve_references()
    config.model.update(arch)
    return config


def _resolve(path: str, fmt: str, expert: str | None) -> str:
    """The model folder: `path` itself, or the expert's folder inside a pipeline/release root
    (`transformer_2/`, `low_noise_model/`; expert None there: the root must hold one model)."""
    folders = SUBFOLDERS[fmt]
    if expert is not None and expert not in folders:
        raise ValueError(f"expert must be one of {tuple(folders)}, got {expert!r}")
    present = [e for e, f in folders.items() if os.path.isdir(os.path.join(path, f))]
    if expert is None and len(present) == len(folders):
        raise ValueError(f"{path} holds both A14B experts ({', '.join(f + '/' for f in folders.values())}): "
                         "say which one to load (--expert high|low)")
    want = expert or "high"
    if want in present:
        return os.path.join(path, folders[want])
    if present:
        raise FileNotFoundError(f"{path}: no {folders[want]}/ folder for the {want}-noise expert")
    named = {f: e for e, f in folders.items()}.get(os.path.basename(os.path.normpath(path)))
    if expert is not None and named not in (None, expert):
        raise ValueError(f"{path} is the {named}-noise expert's folder, not the {expert}-noise one")
    return path


def _read_config_json(path: str, source: str) -> dict:
    file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{source}: no config.json beside the weights (looked for {file})")
    with open(file) as f:
        return json.load(f)


def _load(path: str, fmt: str, config, expert, rngs_seed: int = 0) -> WanDiT:
    path = _resolve(path, fmt, expert)
    raw = _read_config_json(path, path)
    arch = arch_from_diffusers(raw, path) if fmt == "diffusers" else arch_from_official(raw, path)
    config = config_for(arch, config)
    abstract = nnx.eval_shape(lambda: WanDiT.from_config(config, rngs=nnx.Rngs(rngs_seed)))
    layout = torch_layout(abstract)
    reader = SafetensorsReader(path)
    shapes = reader.shapes()
    if fmt == "official":
        _, originals = N.strip_official_prefix(shapes)
        renamed = {(N.official_to_diffusers(s) or s): o for s, o in originals.items()}
        shapes = {d: shapes[o] for d, o in renamed.items()}
        get = lambda name: reader.get(renamed[name])  # noqa: E731
    else:
        get = reader.get
    check_tensors(layout, shapes, path)
    return fill_params(abstract, get, layout, config.model.param_dtype)


def load_diffusers(path: str, config=None, *, expert: str | None = None) -> WanDiT:
    """WanDiT from a diffusers `transformer/` folder (or a pipeline root; `expert="low"` picks
    `transformer_2/`). `config` supplies dtypes/attention settings; the architecture comes from
    `config.json`."""
    return _load(path, "diffusers", config, expert)


def load_official(path: str, config=None, *, expert: str | None = None) -> WanDiT:
    """WanDiT from an official Wan folder (`high_noise_model/` / `low_noise_model/` for A14B)."""
    return _load(path, "official", config, expert)


def _save(model: WanDiT, config_json: dict, out: str, rename, dtype, max_shard_bytes) -> str:
    layout = torch_layout(model)
    sizes, produce = tensor_producer(model, layout, dtype)
    sizes = {rename(n): s for n, s in sizes.items()}
    back = {rename(n): n for n in layout}
    with atomic_directory(out) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        write_sharded(tmp, sizes, lambda n: produce(back[n]), max_shard_bytes)
    return out


def save_diffusers(model: WanDiT, path: str, *, expert: str | None = None, dtype=None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Write `config.json` + safetensors loadable by `WanTransformer3DModel.from_pretrained`.

    A14B experts go to `path/transformer` (high) and `path/transformer_2` (low).
    """
    out = os.path.join(path, SUBFOLDERS["diffusers"][expert]) if expert else path
    return _save(model, diffusers_config(model.config), out, lambda n: n, dtype, max_shard_bytes)


def save_official(model: WanDiT, path: str, *, expert: str | None = None, dtype=None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Write the official Wan layout (`blocks.0.self_attn.q.weight`, ...) with its config.json."""
    out = os.path.join(path, SUBFOLDERS["official"][expert]) if expert else path
    return _save(model, official_config(model.config), out, N.diffusers_to_official, dtype,
                 max_shard_bytes)
