"""Context parallelism: the film's token sequence split over the mesh's `context` axis (DESIGN §6).

    with jax.set_mesh(mesh):          # attention/dispatch.py routes here when context > 1
        out = context_shot_attention(q, k, v, layout, mesh=mesh, strategy="ulysses", ...)

q, k, v: [B, L, H, D] global arrays, batch over ("data", "fsdp"), sequence over "context",
heads over "tensor". The layout is traced data (a new cut never recompiles), replicated over
`context` and sharded like the batch.

`ulysses`: all-to-all from sequence- to head-sharded ([B, L/C, H/T] -> [B, L, H/(T C)]), the
local block plan over the whole film for those heads (whatever executor `impl` picks), and
all-to-all back. Works for every layout; needs heads % (tensor x context) == 0.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

STRATEGIES = ("ulysses",)


def _batch_axes(mesh, batch: int):
    """Mesh axes the batch is split over (those of data/fsdp with size > 1), or None."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    if axes and batch % math.prod(mesh.shape[a] for a in axes):
        raise ValueError(f"batch {batch} is not divisible by the mesh's batch axes {axes} "
                         f"({[mesh.shape[a] for a in axes]})")
    return axes or None


def check_context_split(num_heads: int, length: int, mesh, strategy: str) -> None:
    """Clear errors before tracing any collective: sequence / heads divisibility."""
    c, t = mesh.shape["context"], mesh.shape.get("tensor", 1)
    if strategy not in STRATEGIES:
        raise ValueError(f"context strategy {strategy!r} is not one of {STRATEGIES}")
    if length % c:
        raise ValueError(f"the film's {length} tokens do not split evenly over context={c} devices")
    if num_heads % t:
        raise ValueError(f"{num_heads} heads do not split over tensor={t} devices")
    if strategy == "ulysses" and num_heads % (t * c):
        raise ValueError(f"ulysses needs heads divisible by tensor x context = {t} x {c}; the "
                         f"model has {num_heads} heads (use another context size or shot_aware)")


def context_shot_attention(q, k, v, layout, *, mesh, strategy="ulysses", mode="sparse",
                           impl="auto", summary_self_weight=2.0, block_q=128, block_kv=128):
    """Shot attention with the sequence split over `context` (see module doc). Returns [B, L, H, D]."""
    from holocine_jax.attention.dispatch import shot_attention

    b, length, heads, _ = q.shape
    check_context_split(heads, length, mesh, strategy)
    batch = _batch_axes(mesh, b)
    tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
    seq_spec = P(batch, "context", tensor, None)
    layout = layout.broadcast_to_batch(b)
    layout_spec = jax.tree.map(lambda x: P(batch, *([None] * (x.ndim - 1))), layout)
    local = dict(mode=mode, impl=impl, summary_self_weight=summary_self_weight, block_q=block_q,
                 block_kv=block_kv)

    def ulysses(q, k, v, layout):
        """[b, L/C, h, D] -> heads split over context -> [b, L, h/C, D] -> back."""
        to_heads = lambda x: jax.lax.all_to_all(x, "context", 2, 1, tiled=True)
        out = shot_attention(to_heads(q), to_heads(k), to_heads(v), layout, **local)
        return jax.lax.all_to_all(out, "context", 1, 2, tiled=True)

    return jax.shard_map(ulysses, mesh=mesh, in_specs=(seq_spec,) * 3 + (layout_spec,),
                         out_specs=seq_spec, check_vma=False)(q, k, v, layout)
