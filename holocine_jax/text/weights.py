"""Load UMT5 encoder weights: transformers layout or the official Wan layout (DESIGN §7, §13).

    encoder = load_umt5("/ckpt/umt5-xxl")     # config.json + model.safetensors (or shards + index)
    encoder = load_umt5("/ckpt/models_t5_umt5-xxl-enc-bf16.safetensors")   # official Wan names

transformers names are our NNX paths (`shared.weight`, `encoder.block.3.layer.0.SelfAttention.q
.weight`, ...). Decoder / lm_head tensors of a full `UMT5ForConditionalGeneration` checkpoint are
ignored; `encoder.embed_tokens.weight` is the tied copy of `shared.weight`.

The official file (Wan's `T5Encoder`, `models_t5_umt5-xxl-enc-bf16.pth` saved as safetensors,
e.g. `safetensors.torch.save_file(torch.load(pth), out)`) differs by names only:

    token_embedding.weight               shared.weight
    norm.weight                          encoder.final_layer_norm.weight
    blocks.N.norm1.weight                encoder.block.N.layer.0.layer_norm.weight
    blocks.N.attn.{q,k,v,o}.weight       encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight
    blocks.N.pos_embedding.embedding.weight  encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight
    blocks.N.norm2.weight                encoder.block.N.layer.1.layer_norm.weight
    blocks.N.ffn.gate.0.weight           encoder.block.N.layer.1.DenseReluDense.wi_0.weight  (GELU branch)
    blocks.N.ffn.fc1.weight              encoder.block.N.layer.1.DenseReluDense.wi_1.weight
    blocks.N.ffn.fc2.weight              encoder.block.N.layer.1.DenseReluDense.wo.weight

It has no config: the sizes are read from the tensor shapes (gated tanh-GELU, eps 1e-6,
max distance 128, as Wan's `umt5_xxl`).
"""
from __future__ import annotations

import json
import os
import re

from flax import nnx

from holocine_jax.convert.layout import check_tensors, fill_params, torch_layout
from holocine_jax.convert.safetensors_io import SafetensorsReader
from holocine_jax.text.umt5 import UMT5Arch, UMT5Encoder

OFFICIAL_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
OFFICIAL_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_OFFICIAL_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_IGNORED = ("decoder.", "lm_head.")
TIED = "encoder.embed_tokens.weight"


def official_to_transformers(name: str) -> str | None:
    """`blocks.3.attn.q.weight` -> `encoder.block.3.layer.0.SelfAttention.q.weight`; None if unknown."""
    if name in OFFICIAL_TOP:
        return OFFICIAL_TOP[name]
    m = _OFFICIAL_BLOCK_RE.match(name)
    if m and m.group(2) in OFFICIAL_BLOCK:
        return f"encoder.block.{m.group(1)}.{OFFICIAL_BLOCK[m.group(2)]}"
    return None


def umt5_layout(abstract: UMT5Encoder) -> dict:
    """{transformers tensor name: TensorEntry} for a (possibly abstract) encoder."""
    rename = lambda n: re.sub(r"\.embedding$", ".weight", n)  # noqa: E731  (nnx.Embed's table)
    return {rename(n): e for n, e in torch_layout(abstract).items()}


def arch_from_official(shapes: dict, source: str, **overrides) -> UMT5Arch:
    """UMT5Arch of an official-layout file from its tensor shapes."""
    try:
        vocab, d_model = shapes["token_embedding.weight"]
        inner, _ = shapes["blocks.0.attn.q.weight"]
        buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        d_ff, _ = shapes["blocks.0.ffn.fc1.weight"]
    except KeyError as e:
        raise ValueError(f"{source}: not an official Wan UMT5 file (no tensor {e.args[0]!r})") from None
    layers = 1 + max(int(m.group(1)) for n in shapes if (m := _OFFICIAL_BLOCK_RE.match(n)))
    return UMT5Arch(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                    num_heads=heads, relative_attention_num_buckets=buckets, **overrides)


def load_umt5(path: str, *, dtype: str | None = None, param_dtype: str | None = None) -> UMT5Encoder:
    """UMT5 encoder from a transformers-layout directory (config.json + safetensors, sharded too)
    or an official Wan-layout safetensors file/directory (no config.json).

    dtype / param_dtype default to the checkpoint's config `dtype` (else bfloat16). Every missing,
    unexpected or mis-shaped tensor is reported in one CheckpointMismatchError before any data is read.
    """
    reader = SafetensorsReader(path)
    shapes = reader.shapes()
    config_json = os.path.join(path, "config.json") if os.path.isdir(path) else ""
    official = "token_embedding.weight" in shapes
    if official:
        names = {official_to_transformers(n) or n: n for n in shapes}
    else:
        names = {n: n for n in shapes if not n.startswith(_IGNORED)}
        if "shared.weight" not in names and TIED in names:
            names["shared.weight"] = names.pop(TIED)
        names.pop(TIED, None)
    shapes = {n: shapes[src] for n, src in names.items()}
    if config_json and os.path.exists(config_json):
        with open(config_json) as f:
            hf = json.load(f)
        if hf.get("model_type") not in (None, "umt5", "t5", "mt5"):
            raise ValueError(f"{config_json}: model_type {hf.get('model_type')!r} is not a UMT5 encoder")
        dtype_default = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16")
        kinds = dict(dtype=dtype or dtype_default, param_dtype=param_dtype or dtype_default)
        arch = UMT5Arch.from_hf_config(hf, **kinds)
    elif official:
        arch = arch_from_official(dict(reader.shapes()), path, dtype=dtype or "bfloat16",
                                  param_dtype=param_dtype or "bfloat16")
    else:
        raise FileNotFoundError(f"{path}: transformers-layout UMT5 weights need a config.json next to them")
    abstract = nnx.eval_shape(lambda: UMT5Encoder(arch, rngs=nnx.Rngs(0)))
    layout = umt5_layout(abstract)
    check_tensors(layout, shapes, path)
    return fill_params(abstract, lambda n: reader.get(names[n]), layout, arch.param_dtype)
