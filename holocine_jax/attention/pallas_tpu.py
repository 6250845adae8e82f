"""Pallas TPU (Mosaic) kernels for shot attention over a BlockPlan (DESIGN §5).

    out = shot_attention_pallas_tpu(q, k, v, plan, summary_self_weight=2.0)   # [B, L, H, D]

The grid walks a flat list of the plan's active block pairs — (batch, head, step), not
(q block, kv block) — so skipped pairs cost nothing: forward and dQ walk the pairs row by row
(the output block stays in VMEM across a row), dK/dV column by column (the transposed lists).
The list arrives by scalar prefetch (SMEM): one int32 per step packing (row, column) and flags
(first / last of its row, full block); films of a batch run one after another (`lax.map`) so
SMEM holds one film's list. The mask of a partial block is recomputed in VMEM from per-token
shot ids and summary flags; a full block skips it. Nothing [L, L] exists.

Grid length: a static bound on the number of active pairs. When the plan is concrete at trace
time (a fixed film: sampling, the AOT checks) it is the exact count, so the compiled program's
work is the layout's; under a traced plan it is the dense count (steps past the real list are
skipped without DMA, at the cost of an empty grid step each). `pl.CostEstimate` reports the work
of the bound. Accumulation is float32; inputs float32 or bfloat16; head_dim 64 or 128.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from holocine_jax.attention.plan import BlockPlan
from holocine_jax.shots import own_summary, self_attention_allowed

_F32 = jnp.float32
# packed step: row << 17 | column << 3 | flags (1 full, 2 first of its row, 4 last of its row)
_ROW, _COL, _BLOCKS = 17, 3, 1 << 14


# ----------------------------------------------------------------------------- step lists
def _bound(count) -> int | None:
    """Exact max (over the batch) of active pairs when `count` [B, n] is concrete, else None."""
    if isinstance(count, jax.core.Tracer):
        return None
    return max(1, int(np.max(np.sum(np.asarray(count), axis=-1))))


def _steps(index, full, count, bound: int):
    """Flatten per-row lists (index/full [B, n, m], count [B, n]) into `bound` packed steps
    [B, S] and the number of real steps [B]. Steps past it repeat the last real one (no DMA)."""
    b, n, m = index.shape
    if n >= _BLOCKS or m >= _BLOCKS:
        raise ValueError(f"{n} x {m} blocks exceed the packed step format ({_BLOCKS} per side)")
    ends = jnp.cumsum(count, axis=-1)
    starts = ends - count
    total = ends[:, -1]
    t = jnp.minimum(jnp.arange(bound)[None], jnp.maximum(total[:, None] - 1, 0))
    row = jax.vmap(lambda e, x: jnp.searchsorted(e, x, side="right"))(ends, t).astype(jnp.int32)
    row = jnp.minimum(row, n - 1)
    slot = t - jnp.take_along_axis(starts, row, axis=1)
    flat = row * m + slot
    col = jnp.take_along_axis(index.reshape(b, n * m), flat, axis=1)
    is_full = jnp.take_along_axis(full.reshape(b, n * m), flat, axis=1)
    last = slot == jnp.take_along_axis(count, row, axis=1) - 1
    flags = is_full.astype(jnp.int32) | (slot == 0) * 2 | last * 4
    return (row << _ROW) | (col << _COL) | flags, total


# ----------------------------------------------------------------------------- kernels
def block_logits(q, k, qs, ks, km, full, *, mode, log_w, scale):
    """Masked, biased f32 logits [bq, bk] of one block pair (q [bq, D], k [bk, D]; per-token
    shot ids qs [bq, 1], ks [1, bk], summary flags km [1, bk]; `full` != 0 skips the mask)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=_F32) * scale
    if mode == "sparse" and log_w != 0.0:
        s = s + log_w * own_summary(qs, ks, km).astype(_F32)
    allowed = self_attention_allowed(qs, ks, km, mode) | (full != 0)
    return jnp.where(allowed, s, -jnp.inf)


def _grid_step(steps_ref, total_ref, bound):
    """(flags, valid, first of its row, last of its row) of this grid step."""
    b, t = pl.program_id(0), pl.program_id(2)
    flags = steps_ref[b * bound + t] & 7
    valid = t < total_ref[b]
    return flags, valid, valid & (flags & 2 != 0), valid & (flags & 4 != 0)


def _fwd_kernel(steps_ref, total_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, bound, **kw):
    flags, valid, first, last = _grid_step(steps_ref, total_ref, bound)

    @pl.when(first)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    @pl.when(valid)
    def _step():
        s = block_logits(q_ref[...], k_ref[...], qs_ref[...].T, ks_ref[...], km_ref[...] != 0,
                    flags & 1, **kw)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=-1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=_F32)
        m_sc[...] = m_new

    @pl.when(last)
    def _finish():
        l = l_sc[...]
        seen = l > 0
        o_ref[...] = jnp.where(seen, acc_sc[...] / jnp.where(seen, l, 1.0), 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf).T


def _dq_kernel(steps_ref, total_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref,
               do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, bound, **kw):
    flags, valid, first, last = _grid_step(steps_ref, total_ref, bound)

    @pl.when(first)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

    @pl.when(valid)
    def _step():
        k, v = k_ref[...], v_ref[...]
        s = block_logits(q_ref[...], k, qs_ref[...].T, ks_ref[...], km_ref[...] != 0, flags & 1, **kw)
        lse = lse_ref[...].T
        p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0))
        dp = jax.lax.dot_general(do_ref[...], v, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
        ds = p * (dp - delta_ref[...].T)
        dq_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                          preferred_element_type=_F32)

    @pl.when(last)
    def _finish():
        dq_ref[...] = (dq_sc[...] * kw["scale"]).astype(dq_ref.dtype)


def _dkv_kernel(steps_ref, total_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, bound, **kw):
    flags, valid, first, last = _grid_step(steps_ref, total_ref, bound)

    @pl.when(first)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    @pl.when(valid)
    def _step():
        q, do, v = q_ref[...], do_ref[...], v_ref[...]
        s = block_logits(q, k_ref[...], qs_ref[...].T, ks_ref[...], km_ref[...] != 0, flags & 1, **kw)
        lse = lse_ref[...].T
        p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0))
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                          preferred_element_type=_F32)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
        ds = p * (dp - delta_ref[...].T)
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                          preferred_element_type=_F32)

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_sc[...] * kw["scale"]).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls
def _pad_to(x, length, axis, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _specs(bound, bq, bk, d, rows_first: bool):
    """BlockSpecs for (q-side, kv-side, q ids, k ids, q-side stats) under a step list whose
    packed major index is the q block (rows_first) or the kv block (dK/dV)."""
    def blocks(b, t, steps):
        packed = steps[b * bound + t]
        major, minor = packed >> _ROW, (packed >> _COL) & (_BLOCKS - 1)
        return (major, minor) if rows_first else (minor, major)

    q_map = lambda b, h, t, s, n: (b, h, blocks(b, t, s)[0], 0)
    k_map = lambda b, h, t, s, n: (b, h, blocks(b, t, s)[1], 0)
    return dict(
        q=pl.BlockSpec((None, None, bq, d), q_map),
        k=pl.BlockSpec((None, None, bk, d), k_map),
        qs=pl.BlockSpec((None, 1, bq), lambda b, h, t, s, n: (b, 0, blocks(b, t, s)[0])),
        ks=pl.BlockSpec((None, 1, bk), lambda b, h, t, s, n: (b, 0, blocks(b, t, s)[1])),
        stat=pl.BlockSpec((None, None, 1, bq), lambda b, h, t, s, n: (b, h, 0, blocks(b, t, s)[0])))


def _call(kernel, heads, bound, in_specs, out_specs, out_shape, scratch, cost, interpret):
    """pallas_call(steps [B, S], total [B], *arrays) run film by film (`lax.map` over B):
    the scalar-prefetched step list of one film is what SMEM holds."""
    one = lambda shape: jax.ShapeDtypeStruct((1,) + shape.shape[1:], shape.dtype)
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(1, heads, bound), in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=jax.tree.map(one, out_shape),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=interpret)

    def run(steps, total, *arrays):
        film = lambda xs: jax.tree.map(lambda y: y[0], call(xs[0].reshape(-1), xs[1][None],
                                                            *[x[None] for x in xs[2:]]))
        if steps.shape[0] == 1:
            return jax.tree.map(lambda y: y[None], film([x[0] for x in (steps, total, *arrays)]))
        return jax.lax.map(film, (steps, total, *arrays))

    return run


def _inputs(q, k, v, plan):
    """[B, L, H, D] -> padded [B, H, L_pad, D]; shot vectors as lane-dense rows [B, 1, L_pad]."""
    nq, nk = plan.kv_index.shape[1], plan.q_index.shape[1]
    bq, bk = plan.block_q, plan.block_kv
    tq = lambda x, n: _pad_to(jnp.swapaxes(x, 1, 2), n, axis=2)
    qs = plan.q_shot[:, None, :].astype(jnp.int32)
    ks = plan.k_shot[:, None, :].astype(jnp.int32)
    km = plan.k_summary[:, None, :].astype(jnp.int32)
    return tq(q, nq * bq), tq(k, nk * bk), tq(v, nk * bk), qs, ks, km


def _forward(q, k, v, plan, log_w, interpret, bound):
    b, length, h, d = q.shape
    bq, bk = plan.block_q, plan.block_kv
    nq = plan.kv_index.shape[1]
    steps, total = _steps(plan.kv_index, plan.kv_full, plan.kv_count, bound)
    qt, kt, vt, qs, ks, km = _inputs(q, k, v, plan)
    sp = _specs(bound, bq, bk, d, rows_first=True)
    kw = dict(bound=bound, mode=plan.mode, log_w=log_w, scale=1.0 / math.sqrt(d))
    pairs = h * bound                                 # per film: the call runs B times
    cost = pl.CostEstimate(flops=4 * pairs * bq * bk * d, transcendentals=pairs * bq * bk,
                           bytes_accessed=pairs * (bq + 2 * bk) * d * q.dtype.itemsize)
    out, lse = _call(
        functools.partial(_fwd_kernel, **kw), h, bound,
        [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"], sp["ks"]], [sp["q"], sp["stat"]],
        [jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, nq * bq), _F32)],
        [pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, d), _F32)],
        cost, interpret)(steps, total, qt, kt, vt, qs, ks, km)
    seen = _rows_seen(plan.kv_count, bq)[:, None]                # rows no step visited
    out = jnp.where(seen[..., None], out, 0)
    lse = jnp.where(seen[:, :, None], lse, -jnp.inf)
    return jnp.swapaxes(out, 1, 2)[:, :length], lse


def _rows_seen(count, block):
    """[B, n*block] whether the block of each token row has at least one step."""
    return jnp.repeat(count > 0, block, axis=-1)


def _backward(q, k, v, out, lse, plan, log_w, do, interpret, row_bound, col_bound):
    b, length, h, d = q.shape
    bq, bk = plan.block_q, plan.block_kv
    nq, nk = plan.kv_index.shape[1], plan.q_index.shape[1]
    qt, kt, vt, qs, ks, km = _inputs(q, k, v, plan)
    dot = _pad_to(jnp.swapaxes(do, 1, 2), nq * bq, axis=2)
    delta = jnp.sum(dot.astype(_F32) * _pad_to(jnp.swapaxes(out, 1, 2), nq * bq, axis=2).astype(_F32),
                    axis=-1)[:, :, None]                      # [B, H, 1, L_pad] like lse
    kw = dict(mode=plan.mode, log_w=log_w, scale=1.0 / math.sqrt(d))
    args = (qt, kt, vt, qs, ks, km, dot, lse, delta)

    steps, total = _steps(plan.kv_index, plan.kv_full, plan.kv_count, row_bound)
    sp = _specs(row_bound, bq, bk, d, rows_first=True)
    pairs = h * row_bound
    cost = pl.CostEstimate(flops=6 * pairs * bq * bk * d, transcendentals=pairs * bq * bk,
                           bytes_accessed=pairs * (3 * bq + 2 * bk) * d * q.dtype.itemsize)
    dq = _call(functools.partial(_dq_kernel, bound=row_bound, **kw), h, row_bound,
               [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"], sp["ks"], sp["q"], sp["stat"],
                sp["stat"]], sp["q"], jax.ShapeDtypeStruct(qt.shape, q.dtype),
               [pltpu.VMEM((bq, d), _F32)], cost, interpret)(steps, total, *args)
    dq = jnp.where(_rows_seen(plan.kv_count, bq)[:, None, :, None], dq, 0)

    steps, total = _steps(plan.q_index, plan.q_full, plan.q_count, col_bound)
    sp = _specs(col_bound, bq, bk, d, rows_first=False)
    pairs = h * col_bound
    cost = pl.CostEstimate(flops=8 * pairs * bq * bk * d, transcendentals=pairs * bq * bk,
                           bytes_accessed=pairs * (3 * bq + 4 * bk) * d * q.dtype.itemsize)
    dk, dv = _call(functools.partial(_dkv_kernel, bound=col_bound, **kw), h, col_bound,
                   [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"], sp["ks"], sp["q"], sp["stat"],
                    sp["stat"]], [sp["k"], sp["k"]],
                   [jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
                   [pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, d), _F32)], cost,
                   interpret)(steps, total, *args)
    cols = _rows_seen(plan.q_count, bk)[:, None, :, None]
    back = lambda x, n: jnp.swapaxes(x, 1, 2)[:, :n]
    return (back(dq, length), back(jnp.where(cols, dk, 0), k.shape[1]),
            back(jnp.where(cols, dv, 0), v.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q, k, v, plan, log_w, interpret, bounds):
    return _forward(q, k, v, plan, log_w, interpret, bounds[0])[0]


def _attend_fwd(q, k, v, plan, log_w, interpret, bounds):
    out, lse = _forward(q, k, v, plan, log_w, interpret, bounds[0])
    return out, (q, k, v, out, lse, plan)


def _attend_bwd(log_w, interpret, bounds, res, do):
    q, k, v, out, lse, plan = res
    dq, dk, dv = _backward(q, k, v, out, lse, plan, log_w, do, interpret, *bounds)
    return dq, dk, dv, jax.tree.map(lambda x: None, plan)


_attend.defvjp(_attend_fwd, _attend_bwd)


def shot_attention_pallas_tpu(q, k, v, plan: BlockPlan, *, summary_self_weight=2.0,
                              interpret=False):
    """Shot attention over a block plan with the Mosaic kernels. q: [B, L, H, D]; k, v:
    [B, Lk, H, D] -> [B, L, H, D]. `interpret=True` runs the Pallas interpreter (any backend)."""
    if q.shape[1] != plan.num_tokens:
        raise ValueError(f"sequence length {q.shape[1]} != plan tokens {plan.num_tokens}")
    if plan.block_q % 8 or plan.block_kv % 128 and not interpret:
        raise ValueError(f"TPU blocks must be multiples of (8, 128); got block_q={plan.block_q}, "
                         f"block_kv={plan.block_kv}")
    log_w = math.log(summary_self_weight) if plan.mode == "sparse" else 0.0
    dense = plan.kv_index.shape[1] * plan.q_index.shape[1]
    bounds = (_bound(plan.kv_count) or dense, _bound(plan.q_count) or dense)   # static: before tracing
    return _attend(q, k, v, plan, float(log_w), bool(interpret), bounds)
