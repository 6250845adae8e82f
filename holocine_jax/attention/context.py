"""Context parallelism: the film's token sequence split over the mesh axis that
`config.mesh.rules` maps `sequence` to (DESIGN §6).

    with jax.set_mesh(mesh):          # attention/dispatch.py routes here and picks the strategy
        out = context_attention(q, k, v, layout, spec, mesh=mesh, rules=rules, strategy="ulysses")

q, k, v: [B, L, H, D] global arrays, laid out by the rules' `batch`, `sequence` and `heads`
axes (the shard_map specs come from `parallel.logical_spec`). The layout is traced data (a new
cut never recompiles), replicated over the sequence axis and sharded like the batch.

`ulysses`: all-to-all from sequence- to head-sharded ([B, L/C, H/T] -> [B, L, H/(T C)]), the
local plan over the whole film for those heads (`executors.attend_local`), and all-to-all
back. Works for every layout; needs heads % (tensor x context) == 0. Per device it moves q, k,
v and the output once: 4 x [B, L/C, H/T, D].

`shot_aware` (ours): a device keeps its query slice [j n, (j+1) n) (n = L/C) and gathers only
the keys its queries may see: a halo of `halo_left` tokens before and `halo_right` after its
slice (the parts of its shots that live on neighbours, by collective-permutes) and, in sparse
mode, the summary tokens of every shot (each device contributes the ones it owns to one
all-reduce of K*S*T tokens; copies already in the window are masked, not counted twice). The
local step is the block plan of the slice against those keys (`make_token_plan`). Per device
it moves 2 x (halo_left + halo_right + max_shots*S*T) tokens of K and V, so it beats ulysses
when shots are short next to a slice. The halos are static (a program serves every layout of
its shape): give the data's largest overhang (`required_halo`); the default is the whole film
(always enough). `choose_strategy` is what the dispatch asks to resolve `auto`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from holocine_jax.attention.executors import attend_local, attend_plan
from holocine_jax.attention.plan import make_token_plan
from holocine_jax.attention.spec import AttentionSpec
from holocine_jax.parallel.mesh import logical_spec

STRATEGIES = ("ulysses", "shot_aware")


def sequence_axis(rules) -> str:
    """The one mesh axis `rules` split the film's sequence over (`config.mesh.rules`)."""
    axis = dict(rules).get("sequence")
    if not isinstance(axis, str):
        raise ValueError(f"config.mesh.rules maps 'sequence' to {axis!r}; context parallelism "
                         f"needs exactly one mesh axis there")
    return axis


def _ways(mesh, entry) -> int:
    """Devices a PartitionSpec entry (None | axis | tuple of axes) splits a dimension over."""
    axes = entry if isinstance(entry, tuple) else (entry,) if entry else ()
    return math.prod(mesh.shape[a] for a in axes)


def _split(mesh, rules):
    """(sequence axis, its size, head-split ways) of the mesh under the rules."""
    seq = sequence_axis(rules)
    return seq, mesh.shape[seq], _ways(mesh, logical_spec(("heads",), rules, mesh)[0])


def _specs(mesh, rules, batch: int):
    """shard_map specs from the rules: ([B, L, H, D] activations, the batch entry)."""
    spec = logical_spec(("batch", "sequence", "heads", None), rules, mesh)
    if batch % _ways(mesh, spec[0]):
        raise ValueError(f"batch {batch} is not divisible by the mesh's batch axes {spec[0]} "
                         f"({_ways(mesh, spec[0])} ways)")
    return spec, spec[0]


def check_context_split(num_heads: int, length: int, mesh, rules, strategy: str) -> None:
    """Clear errors before tracing any collective: sequence / heads divisibility."""
    seq, c, t = _split(mesh, rules)
    if strategy not in STRATEGIES:
        raise ValueError(f"context strategy {strategy!r} is not one of {STRATEGIES}")
    if length % c:
        raise ValueError(f"the film's {length} tokens do not split evenly over {seq}={c} devices")
    if num_heads % t:
        raise ValueError(f"{num_heads} heads do not split over tensor={t} devices")
    if strategy == "ulysses" and num_heads % (t * c):
        raise ValueError(f"ulysses needs heads divisible by tensor x {seq} = {t} x {c}; the "
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


def choose_strategy(spec: AttentionSpec, layout, mesh, rules, num_heads: int, halo) -> str:
    """The strategy that runs: `full` mode has no sparsity to exploit and runs ulysses; `auto`
    runs shot_aware when its static halos move fewer bytes per device (K and V of both halos and
    the summaries) than ulysses (q, k, v, out slices) or the heads do not split for ulysses,
    else ulysses; an explicit strategy runs as given."""
    if spec.mode == "full":
        return "ulysses"
    if spec.context_strategy != "auto":
        return spec.context_strategy
    _, c, t = _split(mesh, rules)
    summaries = layout.max_shots * layout.summary_frames * layout.tokens_per_frame
    moved = 2 * (sum(halo) + (summaries if spec.mode == "sparse" else 0))
    if num_heads % (c * t) or moved < 4 * layout.num_tokens // c:
        return "shot_aware"
    return "ulysses"


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


def _from_neighbours(x, halo: int, n: int, c: int, side: str, axis: str):
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
        pieces.append(jax.lax.ppermute(piece, axis, perm))
    return pieces


def context_attention(q, k, v, layout, spec: AttentionSpec, *, mesh, rules, strategy: str,
                      halo=None):
    """Shot attention with the sequence split over the rules' `sequence` axis (module doc).

    q, k, v: [B, L, H, D] -> [B, L, H, D]. strategy: ulysses | shot_aware (resolved by the
    dispatch); halo: shot_aware's static (left, right) halo in tokens (None: the whole film).
    """
    b, length, heads, _ = q.shape
    check_context_split(heads, length, mesh, rules, strategy)
    seq_spec, batch = _specs(mesh, rules, b)
    seq, c, _ = _split(mesh, rules)
    layout = layout.broadcast_to_batch(b)
    layout_spec = jax.tree.map(lambda x: P(batch, *([None] * (x.ndim - 1))), layout)

    def ulysses(q, k, v, layout):
        """[b, L/C, h, D] -> heads split over the sequence axis -> [b, L, h/C, D] -> back."""
        to_heads = lambda x: jax.lax.all_to_all(x, seq, 2, 1, tiled=True)
        out = attend_local(to_heads(q), to_heads(k), to_heads(v), layout, spec)
        return jax.lax.all_to_all(out, seq, 1, 2, tiled=True)

    n = length // c
    halo_left, halo_right = halo if halo is not None else halo_tokens(layout, c, -1)

    def shot_aware(q, k, v, layout):
        """q, k, v: [b, n, h, D] this device's slice -> out [b, n, h, D]."""
        start = jax.lax.axis_index(seq) * n
        shot = jnp.pad(layout.token_shot_id(), ((0, 0), (halo_left, halo_right)), constant_values=-1)
        summary = jnp.pad(layout.token_is_summary(), ((0, 0), (halo_left, halo_right)))
        window = n + halo_left + halo_right
        q_shot = jax.lax.dynamic_slice_in_dim(shot, start + halo_left, n, axis=1)
        keys = [jax.lax.dynamic_slice_in_dim(shot, start, window, axis=1)]
        flags = [jax.lax.dynamic_slice_in_dim(summary, start, window, axis=1)]
        kv = [jnp.concatenate(_from_neighbours(x, halo_left, n, c, "left", seq) + [x]
                              + _from_neighbours(x, halo_right, n, c, "right", seq), axis=1)
              for x in (k, v)]
        if spec.mode == "sparse":
            pos, owner_shot = _summary_keys(layout)
            local = pos - start
            mine = ((local >= 0) & (local < n))[..., None, None]
            idx = jnp.clip(local, 0, n - 1)[..., None, None]
            summaries = [jax.lax.psum(jnp.where(mine, jnp.take_along_axis(x, idx, axis=1), 0),
                                      seq) for x in (k, v)]
            seen = (pos >= start - halo_left) & (pos < start + n + halo_right)
            keys.append(jnp.where(seen, -1, owner_shot))
            flags.append(jnp.ones_like(seen))
            kv = [jnp.concatenate([w, s], axis=1) for w, s in zip(kv, summaries)]
        k_shot, k_summary = jnp.concatenate(keys, axis=1), jnp.concatenate(flags, axis=1)
        plan = make_token_plan(q_shot, k_shot, k_summary, mode=spec.mode,
                               block_q=min(spec.block_q, n),
                               block_kv=min(spec.block_kv, k_shot.shape[1]))
        return attend_plan(q, kv[0], kv[1], plan, spec)

    body = ulysses if strategy == "ulysses" else shot_aware
    return jax.shard_map(body, mesh=mesh, in_specs=(seq_spec,) * 3 + (layout_spec,),
                         out_specs=seq_spec, check_vma=False)(q, k, v, layout)
