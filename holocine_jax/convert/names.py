"""Parameter names: diffusers <-> our NNX paths, official Wan <-> diffusers (DESIGN §4, §13).

Our parameter paths mirror diffusers' `WanTransformer3DModel` (`blocks.0.attn1.to_q.weight` is
`blocks.attn1.to_q.kernel[0]` here: blocks are stacked on a leading layer axis, Linear weights
are transposed kernels, norm weights are `scale`). The official layout differs by names only.
"""
from __future__ import annotations

import re

# Official Wan name prefix -> diffusers name prefix (inside `blocks.N.` for block entries).
OFFICIAL_TO_DIFFUSERS_TOP = {
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "head.head.": "proj_out.",
    "head.modulation": "scale_shift_table",
    "patch_embedding.": "patch_embedding.",
}
OFFICIAL_TO_DIFFUSERS_BLOCK = {
    "self_attn.q.": "attn1.to_q.", "self_attn.k.": "attn1.to_k.", "self_attn.v.": "attn1.to_v.",
    "self_attn.o.": "attn1.to_out.0.", "self_attn.norm_q.": "attn1.norm_q.",
    "self_attn.norm_k.": "attn1.norm_k.",
    "cross_attn.q.": "attn2.to_q.", "cross_attn.k.": "attn2.to_k.", "cross_attn.v.": "attn2.to_v.",
    "cross_attn.o.": "attn2.to_out.0.", "cross_attn.norm_q.": "attn2.norm_q.",
    "cross_attn.norm_k.": "attn2.norm_k.",
    "norm3.": "norm2.",  # the affine cross-attention norm (official norm3 == diffusers norm2)
    "ffn.0.": "ffn.net.0.proj.", "ffn.2.": "ffn.net.2.",
    "modulation": "scale_shift_table",
}
# Prefixes some released (DiffSynth / community) files put before the official names.
OFFICIAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _rename(name: str, top: dict, block: dict) -> str | None:
    m = _BLOCK.match(name)
    table, rest, head = (block, m.group(2), f"blocks.{m.group(1)}.") if m else (top, name, "")
    for src, dst in table.items():
        if rest.startswith(src):
            return head + dst + rest[len(src):]
    return None


def official_to_diffusers(name: str) -> str | None:
    """`blocks.3.self_attn.q.weight` -> `blocks.3.attn1.to_q.weight`; None if not a Wan DiT name."""
    return _rename(name, OFFICIAL_TO_DIFFUSERS_TOP, OFFICIAL_TO_DIFFUSERS_BLOCK)


def diffusers_to_official(name: str) -> str | None:
    """Inverse of `official_to_diffusers`."""
    inv = lambda t: {v: k for k, v in t.items()}  # noqa: E731
    return _rename(name, inv(OFFICIAL_TO_DIFFUSERS_TOP), inv(OFFICIAL_TO_DIFFUSERS_BLOCK))


def strip_official_prefix(names) -> tuple[str, dict]:
    """(prefix, {stripped: original}) when every name shares one of OFFICIAL_PREFIXES."""
    names = list(names)
    for prefix in OFFICIAL_PREFIXES:
        if names and all(n.startswith(prefix) for n in names):
            return prefix, {n[len(prefix):]: n for n in names}
    return "", {n: n for n in names}


def nnx_path_to_diffusers(path: tuple, layer: int | None = None) -> str:
    """('blocks', 'attn1', 'to_out', 0, 'kernel'), 3 -> 'blocks.3.attn1.to_out.0.weight'."""
    *parents, leaf = [str(p) for p in path]
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    if parents and parents[0] == "blocks":
        parents = ["blocks", str(layer)] + parents[1:]
    return ".".join(parents + [leaf])
