"""Load Wan VAE weights: diffusers `AutoencoderKLWan` folders and official Wan VAE state dicts.

    vae = load_diffusers_vae("Wan2.1-T2V-1.3B-Diffusers/vae")      # config.json + safetensors
    vae = load_official_vae("Wan2.2_VAE.safetensors", "2.2")          # official names

Our parameter paths are diffusers' names (`decoder.up_blocks.0.resnets.1.conv2.weight` is
`decoder.up_blocks[0].resnets[1].conv2.kernel`), so import is a layout change (layers.py).
Official Wan checkpoints (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`, converted to safetensors with
`safetensors.torch.save_file(torch.load(f))`) use other module names; `official_to_diffusers_vae`
maps them (R = num_res_blocks, inside any residual block `residual.0/2/3/6` -> `norm1/conv1/
norm2/conv2` and `shortcut` -> `conv_shortcut`):

    conv1 / conv2                         -> quant_conv / post_quant_conv
    {en,de}coder.conv1                    -> {en,de}coder.conv_in
    {en,de}coder.middle.0 | .1 | .2       -> {en,de}coder.mid_block.resnets.0 | attentions.0 | resnets.1
    {en,de}coder.head.0 | .2              -> {en,de}coder.norm_out | conv_out
    2.1 encoder.downsamples.n             -> encoder.down_blocks.n
    2.1 decoder.upsamples.n               -> decoder.up_blocks.{n // (R+2)}.resnets.{n % (R+2)}
                                             (the last of each R+2 group: .upsamplers.0)
    2.2 encoder.downsamples.i.downsamples.j -> encoder.down_blocks.i.resnets.j (j = R: .downsampler)
    2.2 decoder.upsamples.i.upsamples.j     -> decoder.up_blocks.i.resnets.j (j = R+1: .upsampler)
"""
from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
from flax import nnx

from holocine_jax.config import wan_vae_arch
from holocine_jax.convert.layout import CheckpointMismatchError, TensorEntry, check_tensors, from_torch
from holocine_jax.convert.names import nnx_path_to_diffusers, strip_official_prefix
from holocine_jax.convert.safetensors_io import SafetensorsReader
from holocine_jax.vae.wan import AutoencoderKLWan, WanVAEArch

__all__ = ["CheckpointMismatchError", "load_diffusers_vae", "load_official_vae", "official_to_diffusers_vae",
           "vae_layout"]


def _kind(path: tuple, ndim: int) -> str:
    if path[-1] == "kernel":
        return {5: "conv", 4: "conv2d"}[ndim]
    return "gamma" if path[-1] == "gamma" else "same"


def _from_torch(kind: str, x):
    """PyTorch layout -> ours: Conv2d [O, I, kh, kw] -> [kh, kw, I, O]; gamma [C, 1, 1(, 1)] reversed."""
    if kind == "conv2d":
        return x.transpose(2, 3, 1, 0)
    return x.T if kind == "gamma" else from_torch(kind, x)


def vae_layout(model: AutoencoderKLWan) -> dict[str, TensorEntry]:
    """{diffusers tensor name: TensorEntry (path, kind, PyTorch shape)} for a (possibly abstract) VAE."""
    entries = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(var.get_value().shape)
        kind = _kind(path, len(shape))
        torch_shape = {"conv": lambda s: (s[4], s[3], *s[:3]), "conv2d": lambda s: (s[3], s[2], *s[:2]),
                       "gamma": lambda s: s[::-1]}.get(kind, lambda s: s)(shape)
        entries[nnx_path_to_diffusers(path)] = TensorEntry(path, None, kind, tuple(torch_shape))
    return entries


def _fill(arch: WanVAEArch, get, shapes: dict, source: str, dtype) -> AutoencoderKLWan:
    abstract = nnx.eval_shape(lambda: AutoencoderKLWan(arch, rngs=nnx.Rngs(0)))
    layout = vae_layout(abstract)
    check_tensors(layout, shapes, source)
    graphdef, state = nnx.split(abstract)
    by_path = {entry.path: (name, entry.kind) for name, entry in layout.items()}
    for path, var in nnx.to_flat_state(state):
        name, kind = by_path[path]
        var.set_value(jnp.asarray(_from_torch(kind, get(name)), dtype))
    return nnx.merge(graphdef, state)


def _weights_dir(path: str) -> str:
    """The VAE folder of a diffusers pipeline root (`vae/`) or the folder itself."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"VAE path {path!r} does not exist")
    sub = os.path.join(path, "vae")
    return sub if os.path.isdir(sub) and not os.path.exists(os.path.join(path, "config.json")) else path


def load_diffusers_vae(path: str, *, dtype="float32") -> AutoencoderKLWan:
    """AutoencoderKLWan from a local diffusers folder (`config.json` + safetensors, or a pipeline
    root with `vae/`). The architecture comes from `config.json`."""
    folder = _weights_dir(path)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{folder}: no config.json (a diffusers AutoencoderKLWan folder has one)")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ValueError(f"{config_file}: _class_name is {config['_class_name']!r}, expected AutoencoderKLWan")
    arch = WanVAEArch.from_dict(config, config_file)
    reader = SafetensorsReader(folder)
    return _fill(arch, reader.get, reader.shapes(), folder, dtype)


_RES = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
        "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}
_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.", "encoder.conv1.": "encoder.conv_in.",
        "decoder.conv1.": "decoder.conv_in.", "encoder.head.0.": "encoder.norm_out.",
        "encoder.head.2.": "encoder.conv_out.", "decoder.head.0.": "decoder.norm_out.",
        "decoder.head.2.": "decoder.conv_out."}
_MIDDLE = {"0": "resnets.0.", "1": "attentions.0.", "2": "resnets.1."}


def official_to_diffusers_vae(name: str, arch: WanVAEArch) -> str | None:
    """Official Wan VAE tensor name -> diffusers name (table in the module docstring); None if unknown."""
    for src, dst in _TOP.items():
        if name.startswith(src):
            return dst + name[len(src):]
    r = arch.num_res_blocks
    m = re.match(r"^(encoder|decoder)\.middle\.(\d)\.(.*)$", name)
    if m:
        head, rest = f"{m.group(1)}.mid_block.{_MIDDLE[m.group(2)]}", m.group(3)
    elif arch.is_residual:
        m = re.match(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)$", name)
        if not m:
            return None
        enc, i, j, rest = m.group(1).startswith("encoder"), m.group(2), int(m.group(3)), m.group(4)
        sampler = "downsampler" if enc else "upsampler"
        head = (f"encoder.down_blocks.{i}." if enc else f"decoder.up_blocks.{i}.") + (
            f"{sampler}." if j == (r if enc else r + 1) else f"resnets.{j}.")
    else:
        m = re.match(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(.*)$", name)
        if not m:
            return None
        n, rest = int(m.group(2)), m.group(3)
        if m.group(1).startswith("encoder"):
            head = f"encoder.down_blocks.{n}."
        else:
            i, j = divmod(n, r + 2)
            head = f"decoder.up_blocks.{i}." + ("upsamplers.0." if j == r + 1 else f"resnets.{j}.")
    for src, dst in _RES.items():
        if rest.startswith(src):
            return head + dst + rest[len(src):]
    return head + rest


def load_official_vae(path: str, arch, *, dtype="float32") -> AutoencoderKLWan:
    """AutoencoderKLWan from an official Wan VAE state dict saved as safetensors.

    `arch`: a WanVAEArch, a dict like `config.vae`, or "2.1" / "2.2" (the Wan tables in configs/base.py).
    """
    if str(path).endswith((".pth", ".pt", ".ckpt")):
        raise ValueError(f"{path}: PyTorch pickles are not read; convert it first with "
                         "safetensors.torch.save_file(torch.load(path), 'vae.safetensors')")
    if isinstance(arch, str):
        arch = wan_vae_arch(arch)
    arch = arch if isinstance(arch, WanVAEArch) else WanVAEArch.from_dict(arch, str(path))
    reader = SafetensorsReader(path)
    _, originals = strip_official_prefix(reader.shapes())
    renamed = {(official_to_diffusers_vae(s, arch) or s): o for s, o in originals.items()}
    all_shapes = reader.shapes()
    shapes = {d: all_shapes[o] for d, o in renamed.items()}
    return _fill(arch, lambda n: reader.get(renamed[n]), shapes, str(path), dtype)
