"""Block plan of shot attention, built inside jit from a ShotLayout (DESIGN §5).

The sequence is cut into q blocks of `block_q` and kv blocks of `block_kv` tokens (the last block
of each is padded; padding tokens get shot id -1 and allow nothing). For each q block the plan
lists its active kv blocks (at least one allowed pair), each flagged *full* (every pair allowed:
the elementwise mask may be skipped) or partial, padded to a static bound. The transposed lists
(active q blocks per kv block) serve dK/dV kernels that iterate per kv block; the XLA executor
scatter-adds instead, since summary kv blocks are active in every row and make columns dense.
The log(summary_self_weight) bias is not part of the flags: executors add it from the shot ids.

Work is O(L) for per-block summaries plus O(nq * nk) block pairs; no [L, L] tensor exists.
Active and full flags are exact: derived from per-block shot ranges, which is sound because
tokens are sorted by shot and every real shot owns >= 1 frame, so a block holds every shot id
between its smallest and largest.

Static bound: a 1-shot layout (dense) is always within the maxima, so a row may hold up to nk
kv blocks (a column up to nq q blocks); `row_bound`/`col_bound` are those widths. Executors loop
only over the dynamic `max(kv_count)`, which is where sparsity saves time.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from holocine_jax.shots import SELF_ATTENTION_MODES

_BIG = 2**30


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Block plan for a batch. nq = ceil(L/block_q), nk = ceil(L/block_kv).

    kv_index/kv_full: [B, nq, nk] active kv blocks of each q block (first kv_count[B, nq] slots,
    ascending; later slots are padding). q_index/q_full: [B, nk, nq], q_count: [B, nk].
    q_shot: [B, nq*block_q], k_shot/k_summary: [B, nk*block_kv] per-token vectors (padding: -1).
    """
    kv_index: jax.Array
    kv_full: jax.Array
    kv_count: jax.Array
    q_index: jax.Array
    q_full: jax.Array
    q_count: jax.Array
    q_shot: jax.Array
    k_shot: jax.Array
    k_summary: jax.Array
    num_tokens: int = dataclasses.field(metadata=dict(static=True))
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_kv: int = dataclasses.field(metadata=dict(static=True))
    mode: str = dataclasses.field(metadata=dict(static=True))

    @property
    def row_bound(self) -> int:
        """Static width of the per-q-block lists (nk)."""
        return self.kv_index.shape[-1]

    @property
    def col_bound(self) -> int:
        """Static width of the per-kv-block lists (nq)."""
        return self.q_index.shape[-1]

    @property
    def num_active(self):
        """[B] active (q block, kv block) pairs."""
        return jnp.sum(self.kv_count, axis=-1)


jax.tree_util.register_dataclass(BlockPlan)


def num_blocks(length: int, block: int) -> int:
    """ceil(length / block)."""
    return -(-length // block)


def _pad(x, length, value):
    """Pad the last axis of x to `length` with `value`."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])], constant_values=value)


def _block_stats(shot, summary, block):
    """Per-block summaries of token vectors [B, n*block] -> dict of [B, n]."""
    b = shot.shape[0]
    s = shot.reshape(b, -1, block)
    m = summary.reshape(b, -1, block)
    valid = s >= 0
    plain = valid & ~m
    return dict(
        any=valid.any(-1), all=valid.all(-1),
        min=jnp.where(valid, s, _BIG).min(-1), max=jnp.where(valid, s, -1).max(-1),
        any_summary=(valid & m).any(-1),
        plain_min=jnp.where(plain, s, _BIG).min(-1), plain_max=jnp.where(plain, s, -1).max(-1))


def _block_flags(qs, ks, mode):
    """(active, full): [B, nq, nk] from q-block stats qs and kv-block stats ks."""
    q = {n: x[:, :, None] for n, x in qs.items()}
    k = {n: x[:, None, :] for n, x in ks.items()}
    both = q["any"] & k["any"]
    complete = q["all"] & k["all"]
    if mode == "full":
        return both, complete
    overlap = both & (q["min"] <= k["max"]) & (k["min"] <= q["max"])
    one_shot = q["min"] == q["max"]
    if mode == "independent":
        return overlap, complete & one_shot & (k["min"] == q["min"]) & (k["max"] == q["min"])
    if mode == "sparse":
        active = overlap | (both & k["any_summary"])
        no_plain = k["plain_max"] < 0
        plain_same = one_shot & (k["plain_min"] == q["min"]) & (k["plain_max"] == q["min"])
        return active, complete & (no_plain | plain_same)
    raise ValueError(f"attention mode {mode!r} is not one of {SELF_ATTENTION_MODES}")


def _compress(active, full):
    """Rows of [B, n, m] flags -> (index [B, n, m] active first, full flags, count [B, n])."""
    order = jnp.argsort(~active, axis=-1, stable=True).astype(jnp.int32)
    return (order, jnp.take_along_axis(full, order, axis=-1),
            jnp.sum(active, axis=-1, dtype=jnp.int32))


def make_plan(layout, *, mode="sparse", block_q: int, block_kv: int) -> BlockPlan:
    """The block plan of a batched layout for `mode` (jittable, fixed shapes)."""
    shot = layout.token_shot_id()
    if shot.ndim != 2:
        raise ValueError(f"make_plan needs a batched layout, got token ids of shape {shot.shape}")
    return make_token_plan(shot, shot, layout.token_is_summary(), mode=mode, block_q=block_q,
                           block_kv=block_kv)


def make_token_plan(q_shot, k_shot, k_summary, *, mode="sparse", block_q: int,
                    block_kv: int) -> BlockPlan:
    """The block plan of queries and keys given as per-token vectors: q_shot [B, Lq], k_shot /
    k_summary [B, Lk] (shot id -1: a token that allows nothing). `make_plan` is the case q = k =
    the film; context parallelism uses a device's slice against the keys it gathered. The
    flags stay exact for any token order; active lists are tightest when tokens are sorted."""
    length = q_shot.shape[-1]
    nq, nk = num_blocks(length, block_q), num_blocks(k_shot.shape[-1], block_kv)
    q_shot = _pad(q_shot, nq * block_q, -1)
    k_shot = _pad(k_shot, nk * block_kv, -1)
    k_summary = _pad(k_summary, nk * block_kv, False)
    qs = _block_stats(q_shot, jnp.zeros_like(q_shot, bool), block_q)
    ks = _block_stats(k_shot, k_summary, block_kv)
    active, full = _block_flags(qs, ks, mode)
    kv_index, kv_full, kv_count = _compress(active, full)
    q_index, q_full, q_count = _compress(jnp.swapaxes(active, 1, 2), jnp.swapaxes(full, 1, 2))
    return BlockPlan(kv_index, kv_full, kv_count, q_index, q_full, q_count, q_shot, k_shot,
                     k_summary, length, block_q, block_kv, mode)
