"""Context parallelism: the film's token sequence split over the mesh's `context` axis (DESIGN §6).

    with jax.set_mesh(mesh):          # attention/dispatch.py routes here when context > 1
        out = context_shot_attention(q, k, v, layout, mesh=mesh, strategy="ulysses", ...)

q, k, v: [B, L, H, D] global arrays, batch over ("data", "fsdp"), sequence over "context",
heads over "tensor". The layout is traced data (a new cut never recompiles), replicated over
`context` and sharded like the batch.

`ulysses`: all-to-all from sequence- to head-sharded ([B, L/C, H/T] -> [B, L, H/(T C)]), the
local block plan over the whole film for those heads (whatever executor `impl` picks), and
all-to-all back. Works for every layout; needs heads % (tensor x context) == 0. Per device it
moves q, k, v and the output once: 4 x [B, L/C, H/T, D].

`shot_aware` (ours): a device keeps its query slice [j n, (j+1) n) (n = L/C) and gathers only
the keys its queries may see: a halo of `halo_left` tokens before and `halo_right` after its
slice (the parts of its shots that live on neighbours, by collective-permutes) and, in sparse
mode, the summary tokens of every shot (each device contributes the ones it owns to one
all-reduce of K*S*T tokens; copies already in the window are masked, not counted twice). The
local step is the block plan of the slice against those keys (`make_token_plan`). Per device
it moves 2 x (halo_left + halo_right + max_shots*S*T) tokens of K and V, so it beats ulysses
when shots are short next to a slice. The halos are static (a program serves every layout of
its shape): give the data's largest overhang (`required_halo`); the default is the whole film
(always enough). `full` mode has no sparsity to exploit and runs ulysses. Strategy `auto`
(resolved by the attention dispatch, `choose_strategy`) runs shot_aware when its halos move
fewer bytes than ulysses or the heads do not split for ulysses, else ulysses.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from holocine_jax.attention.plan import make_token_plan

STRATEGIES = ("ulysses", "shot_aware")


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


def required_halo(layout, context: int) -> tuple[int, int]:
    """(left, right) tokens of their own shots that the device slices of a concrete layout
    (batched or not) lack: the smallest halos `shot_aware` can run this layout with."""
    length = layout.num_tokens
    shots = np.asarray(layout.token_shot_id()).reshape(-1, length)
    n = length // context
    left = right = 0
    for film in shots:                       # shot ids ascend along the film
        for j in range(context):
            first, last = film[j * n], film[(j + 1) * n - 1]
            left = max(left, j * n - int(np.searchsorted(film, first, "left")))
            right = max(right, int(np.searchsorted(film, last, "right")) - (j + 1) * n)
    return left, right


def halo_tokens(layout, context: int, halo_frames: int) -> tuple[int, int]:
    """Static (left, right) halo in tokens for `config.attention.context_halo_frames`: that
    many latent frames each side (clipped to the film), or the whole film when < 0."""
    bound = layout.num_tokens - layout.num_tokens // context
    tokens = bound if halo_frames < 0 else min(bound, halo_frames * layout.tokens_per_frame)
    return tokens, tokens


def check_halo(layout, context: int, halo_frames: int) -> None:
    """Raise if a concrete layout needs more halo than `halo_frames` (host-side, per batch)."""
    if halo_frames < 0:
        return
    have = halo_tokens(layout, context, halo_frames)
    need = required_halo(layout, context)
    if need[0] > have[0] or need[1] > have[1]:
        t = layout.tokens_per_frame
        raise ValueError(f"a shot overhangs its context slice by {max(need)} tokens "
                         f"({-(-max(need) // t)} latent frames) but config.attention."
                         f"context_halo_frames={halo_frames}; raise it (or -1: the whole film)")


def choose_strategy(strategy: str, layout, mesh, num_heads: int, mode: str, halo) -> str:
    """Resolve `auto`: shot_aware when its static halos move fewer bytes per device (K and V of
    both halos and the summaries) than ulysses (q, k, v, out slices) or the heads do not split
    for ulysses; else ulysses. Other strategies pass through."""
    if strategy != "auto":
        return strategy
    c, t = mesh.shape["context"], mesh.shape.get("tensor", 1)
    summaries = layout.max_shots * layout.summary_frames * layout.tokens_per_frame
    moved = 2 * (sum(halo) + (summaries if mode == "sparse" else 0))
    if num_heads % (c * t) and mode != "full":
        return "shot_aware"
    return "shot_aware" if moved < 4 * layout.num_tokens // c and mode != "full" else "ulysses"


def _summary_keys(layout):
    """Global positions [b, K*S*T] of every shot's summary tokens and their shot ids (-1 for
    padding shots)."""
    s, t, f = layout.summary_frames, layout.tokens_per_frame, layout.num_latent_frames
    starts = jnp.asarray(layout.shot_starts)                                    # [b, K]
    frames = starts[..., None] + jnp.arange(s)                                  # [b, K, S]
    real = (jnp.arange(layout.max_shots) < jnp.asarray(layout.num_shots)[..., None])[..., None]
    valid = real & (frames < f)
    pos = (frames[..., None] * t + jnp.arange(t)).reshape(starts.shape[0], -1)
    shot = jnp.broadcast_to(jnp.arange(layout.max_shots)[:, None, None], (layout.max_shots, s, t))
    shot = jnp.where(jnp.repeat(valid, t, axis=-1).reshape(pos.shape), shot.reshape(-1), -1)
    return pos, shot


def _from_neighbours(x, halo: int, n: int, c: int, side: str):
    """The `halo` tokens before (side "left") or after ("right") this device's slice, from
    the devices that hold them (zeros past the film's ends). x: [b, n, h, D]."""
    pieces = []
    m = -(-halo // n)
    order = range(m, 0, -1) if side == "left" else range(1, m + 1)
    for i in order:
        size = n if i < m else halo - (m - 1) * n
        if side == "left":
            piece, perm = x[:, n - size:], [(s, s + i) for s in range(c - i)]
        else:
            piece, perm = x[:, :size], [(s, s - i) for s in range(i, c)]
        pieces.append(jax.lax.ppermute(piece, "context", perm))
    return pieces


def context_shot_attention(q, k, v, layout, *, mesh, strategy="ulysses", mode="sparse",
                           impl="auto", summary_self_weight=2.0, block_q=128, block_kv=128,
                           halo=None):
    """Shot attention with the sequence split over `context` (see module doc). Returns
    [B, L, H, D]. halo: shot_aware's static (left, right) halo in tokens (None: whole film)."""
    from holocine_jax.attention.dispatch import attend_plan, shot_attention

    b, length, heads, _ = q.shape
    strategy = "ulysses" if mode == "full" else strategy
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

    c = mesh.shape["context"]
    n = length // c
    halo_left, halo_right = halo if halo is not None else halo_tokens(layout, c, -1)

    def shot_aware(q, k, v, layout):
        """q, k, v: [b, n, h, D] this device's slice -> out [b, n, h, D]."""
        start = jax.lax.axis_index("context") * n
        shot = jnp.pad(layout.token_shot_id(), ((0, 0), (halo_left, halo_right)), constant_values=-1)
        summary = jnp.pad(layout.token_is_summary(), ((0, 0), (halo_left, halo_right)))
        window = n + halo_left + halo_right
        q_shot = jax.lax.dynamic_slice_in_dim(shot, start + halo_left, n, axis=1)
        keys = [jax.lax.dynamic_slice_in_dim(shot, start, window, axis=1)]
        flags = [jax.lax.dynamic_slice_in_dim(summary, start, window, axis=1)]
        kv = [jnp.concatenate(_from_neighbours(x, halo_left, n, c, "left") + [x]
                              + _from_neighbours(x, halo_right, n, c, "right"), axis=1)
              for x in (k, v)]
        if mode == "sparse":
            pos, owner_shot = _summary_keys(layout)
            local = pos - start
            mine = ((local >= 0) & (local < n))[..., None, None]
            idx = jnp.clip(local, 0, n - 1)[..., None, None]
            summaries = [jax.lax.psum(jnp.where(mine, jnp.take_along_axis(x, idx, axis=1), 0),
                                      "context") for x in (k, v)]
            seen = (pos >= start - halo_left) & (pos < start + n + halo_right)
            keys.append(jnp.where(seen, -1, owner_shot))
            flags.append(jnp.ones_like(seen))
            kv = [jnp.concatenate([w, s], axis=1) for w, s in zip(kv, summaries)]
        k_shot, k_summary = jnp.concatenate(keys, axis=1), jnp.concatenate(flags, axis=1)
        plan = make_token_plan(q_shot, k_shot, k_summary, mode=mode, block_q=min(block_q, n),
                               block_kv=min(block_kv, k_shot.shape[1]))
        return attend_plan(q, kv[0], kv[1], plan, impl="xla" if impl == "reference" else impl,
                           summary_self_weight=summary_self_weight)

    body = ulysses if strategy == "ulysses" else shot_aware
    return jax.shard_map(body, mesh=mesh, in_specs=(seq_spec,) * 3 + (layout_spec,),
                         out_specs=seq_spec, check_vma=False)(q, k, v, layout)
