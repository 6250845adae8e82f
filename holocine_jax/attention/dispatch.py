"""The one place that decides how attention runs (DESIGN §5, §15).

The model calls `attend` (video self-attention, with its AttentionSpec and sharding rules) and
`cross_attention` (video -> text); `shot_attention` is the public keyword form of `attend`.

- `layout=None`: one shot covering the film, plain attention (`executors.dense_attention`).
- no mesh splitting the sequence: `executors.attend_local` (reference masks, plain attention for
  `full` under impl auto, else the block plan on the platform's executor: impl auto is the
  Pallas kernel on TPU / GPU, the blocked XLA executor on CPU).
- a mesh whose axis for the rules' `sequence` is > 1 (jax.set_mesh, outside shard_map): the film
  is split over devices; the strategy (`spec.context_strategy`, `auto` resolved by bytes moved,
  `full` always ulysses) is chosen here and `context.context_attention` runs it.
"""
from __future__ import annotations

import jax

from holocine_jax.attention.context import choose_strategy, context_attention, halo_tokens, sequence_axis
from holocine_jax.attention.executors import attend_local, dense_attention
from holocine_jax.attention.spec import AttentionSpec

_DEFAULT = AttentionSpec()


def _context_mesh(rules):
    """The active mesh when it splits the sequence (not yet inside shard_map), else None.
    Without rules the mesh axis `context` (parallel.AXES) is taken to be the sequence's."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or rules is not None and dict(rules).get("sequence") is None:
        return None
    seq = "context" if rules is None else sequence_axis(rules)
    if mesh.shape.get(seq, 1) == 1 or seq in mesh.manual_axes:
        return None
    if rules is None:
        raise ValueError(f"the active mesh splits the sequence ({seq}={mesh.shape[seq]}): pass "
                         f"rules=config.mesh.rules so that the shard_map specs follow them")
    return mesh


def attend(q, k, v, layout, spec: AttentionSpec, rules=None):
    """Self-attention over the concatenated film.

    q, k, v: [B, L, H, D] with L = num_latent_frames * h * w. Returns [B, L, H, D].
    layout: ShotLayout, batched (leading B) or unbatched (broadcast); None = plain attention.
    rules: `config.mesh.rules` (logical axis -> mesh axes); needed under a mesh that splits
    the sequence, whose shard_map specs come from them.
    """
    if layout is None:
        return dense_attention(q, k, v)
    mesh = _context_mesh(rules)
    if mesh is None:
        return attend_local(q, k, v, layout, spec)
    halo = halo_tokens(layout, mesh.shape[sequence_axis(rules)], spec.context_halo_frames)
    strategy = choose_strategy(spec, layout, mesh, rules, q.shape[2], halo)
    return context_attention(q, k, v, layout, spec, mesh=mesh, rules=rules, strategy=strategy,
                             halo=halo)


def shot_attention(q, k, v, layout=None, *, mode=_DEFAULT.mode, impl=_DEFAULT.impl,
                   summary_self_weight=_DEFAULT.summary_self_weight, interpret=False,
                   rules=None, **options):
    """`attend` with the AttentionSpec given as keywords: mode, impl, summary_self_weight,
    interpret and any other spec field (block_q, block_kv, context_strategy,
    context_halo_frames; see attention/spec.py). Shapes as `attend`."""
    spec = AttentionSpec(mode=mode, impl=impl, summary_self_weight=summary_self_weight,
                         interpret=interpret, **options)
    return attend(q, k, v, layout, spec, rules)


def cross_attention(q, k, v, layout=None):
    """Video -> text attention. q: [B, L, H, D]; k, v: [B, Lt, H, D]. Returns [B, L, H, D].

    `layout=None` means every token sees all text (`executors.dense_attention`). With
    windows: a dense boolean mask from the window predicate (ShotLayout.cross_attention_mask);
    `jax.nn.dot_product_attention` gives disallowed pairs exactly zero weight, which equals the
    official additive -1e4 to float32 precision since every video token sees the global window.
    """
    if layout is None:
        return dense_attention(q, k, v)
    layout = layout.broadcast_to_batch(q.shape[0])
    mask = layout.cross_attention_mask(k.shape[1])[:, None]  # [B, 1, L, Lt]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
