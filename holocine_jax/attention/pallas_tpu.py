"""Pallas TPU (Mosaic) kernels for shot attention over a BlockPlan (DESIGN §5).

    out = shot_attention_pallas_tpu(q, k, v, plan, summary_self_weight=2.0)   # [B, L, H, D]

The grid walks a list of the plan's active block pairs — (head, step), not (q block, kv
block) — so skipped pairs cost nothing: forward and dQ walk the pairs row by row (the output
block stays in VMEM across a row), dK/dV column by column (the transposed lists). Each step is
one int32 packing (row, column) and flags (first / last of its row, full block), scalar-
prefetched into SMEM. The mask of a partial block is recomputed in VMEM from per-token shot ids
and summary flags; a full block skips it. Nothing [L, L] exists.

The work follows the film, traced or not (training, `sample` and the AOT checks trace the
layout): the list is cut into chunks of whole rows of at most `chunk_width` steps (SMEM holds
one chunk: CHUNK_STEPS int32 = 64 KiB, whatever the film's length), and a `lax.while_loop` runs
one pallas_call per chunk whose grid length is dynamic — exactly that chunk's steps. Films of a
batch run one after another (`lax.map`). Outputs are aliased from chunk to chunk and start as
zeros (lse -inf), which is what rows without active blocks keep. `pl.CostEstimate` is a
chunk's bound for XLA's scheduler, not the work done. Accumulation is float32; inputs float32
or bfloat16; head_dim 64 or 128.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from holocine_jax.attention.plan import BlockPlan
from holocine_jax.shots import own_summary, self_attention_allowed

_F32 = jnp.float32
# packed step: row << 17 | column << 3 | flags (1 full, 2 first of its row, 4 last of its row)
_ROW, _COL, _BLOCKS = 17, 3, 1 << 14
CHUNK_STEPS = 16384  # packed steps per pallas_call: 64 KiB of v5p's 1 MiB SMEM


# ----------------------------------------------------------------------------- step lists
def chunk_width(minor_blocks: int) -> int:
    """Packed steps per pallas_call (SMEM entries): CHUNK_STEPS, or a whole row when longer."""
    return max(CHUNK_STEPS, minor_blocks)


def _chunk(index, full, count, starts, ends, first_row, width: int):
    """The step list of rows first_row.. of one film whose steps fit in `width`: (packed
    [width] int32, number of real steps, the row after the chunk). index/full [n, m] per-row
    lists; count/starts/ends [n]: each row's steps and where they start and end. Entries past
    the real steps repeat the last."""
    n, m = index.shape
    s0 = starts[first_row]
    next_row = jnp.searchsorted(ends, s0 + width, side="right").astype(jnp.int32)
    num = ends[next_row - 1] - s0
    t = s0 + jnp.minimum(jnp.arange(width, dtype=jnp.int32), num - 1)
    row = jnp.minimum(jnp.searchsorted(ends, t, side="right"), n - 1).astype(jnp.int32)
    slot = t - starts[row]
    flat = row * m + slot
    col = index.reshape(-1)[flat]
    flags = (full.reshape(-1)[flat].astype(jnp.int32) | (slot == 0) * 2
             | (slot == count[row] - 1) * 4)
    return (row << _ROW) | (col << _COL) | flags, num, next_row


def walk(call, lists, init, *args):
    """Run `call(packed, num_steps, *args, *outs) -> outs` over one film's step lists
    (index/full [n, m], count [n]) chunk by chunk, rows in order, each chunk's grid exactly its
    steps; `init`: the outputs where no step writes (rows without active blocks)."""
    index, full, count = lists
    ends = jnp.cumsum(count).astype(jnp.int32)
    starts = ends - count
    width = chunk_width(index.shape[1])

    def step(carry):
        row, outs = carry
        packed, num, row = _chunk(index, full, count, starts, ends, row, width)
        return row, tuple(call(packed, num, *args, *outs))

    more = lambda carry: jnp.append(starts, ends[-1])[carry[0]] < ends[-1]   # row n: done
    return jax.lax.while_loop(more, step, (jnp.int32(0), tuple(init)))[1]


# ----------------------------------------------------------------------------- kernels
def block_logits(q, k, qs, ks, km, full, *, mode, log_w, scale):
    """Masked, biased f32 logits [bq, bk] of one block pair (q [bq, D], k [bk, D]; per-token
    shot ids qs [bq, 1], ks [1, bk], summary flags km [1, bk]; `full` != 0 skips the mask)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=_F32) * scale
    if mode == "sparse" and log_w != 0.0:
        s = s + log_w * own_summary(qs, ks, km).astype(_F32)
    allowed = self_attention_allowed(qs, ks, km, mode) | (full != 0)
    return jnp.where(allowed, s, -jnp.inf)


def _grid_step(steps_ref):
    """(flags, first of its row, last of its row) of this grid step: every step is a real pair."""
    flags = steps_ref[pl.program_id(1)] & 7
    return flags, flags & 2 != 0, flags & 4 != 0


def _fwd_kernel(steps_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, **kw):
    flags, first, last = _grid_step(steps_ref)

    @pl.when(first)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

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


def _dq_kernel(steps_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref,
               do_ref, lse_ref, delta_ref, dq_ref, dq_sc, **kw):
    flags, first, last = _grid_step(steps_ref)

    @pl.when(first)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

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


def _dkv_kernel(steps_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, **kw):
    flags, first, last = _grid_step(steps_ref)

    @pl.when(first)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

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


def _specs(bq, bk, d, rows_first: bool):
    """BlockSpecs of one film's arrays (q-side [H, Lq, D], kv-side [H, Lk, D], q ids [1, Lq],
    k ids [1, Lk], q-side stats [H, 1, Lq]) under a step list whose packed major index is the q
    block (rows_first: forward, dQ) or the kv block (dK/dV). Grid: (head, step)."""
    def blocks(t, steps):
        major, minor = steps[t] >> _ROW, (steps[t] >> _COL) & (_BLOCKS - 1)
        return (major, minor) if rows_first else (minor, major)

    return dict(
        q=pl.BlockSpec((None, bq, d), lambda h, t, s: (h, blocks(t, s)[0], 0)),
        k=pl.BlockSpec((None, bk, d), lambda h, t, s: (h, blocks(t, s)[1], 0)),
        qs=pl.BlockSpec((1, bq), lambda h, t, s: (0, blocks(t, s)[0])),
        ks=pl.BlockSpec((1, bk), lambda h, t, s: (0, blocks(t, s)[1])),
        stat=pl.BlockSpec((None, 1, bq), lambda h, t, s: (h, 0, blocks(t, s)[0])))


def _pass(kernel, name, heads, lists, in_specs, out_specs, init, scratch, cost, interpret):
    """One kernel over a batch: films one after another (`lax.map`), each walked chunk by chunk
    (`walk`). Returns run(*arrays [B, ...]) -> outputs [B, ...], `init` [B, ...] where no step
    writes. The outputs are aliased to the previous chunk's (they stay in HBM, `pl.ANY`)."""
    n_in, n_out = len(in_specs), len(out_specs)

    def body(steps_ref, *refs):    # the aliased previous outputs are not read
        return kernel(steps_ref, *refs[:n_in], *refs[n_in + n_out:])

    def call(packed, num, *arrays):
        outs = arrays[n_in:]
        return pl.pallas_call(
            body, name=name,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=(heads, num),
                in_specs=in_specs + [pl.BlockSpec(memory_space=pl.ANY)] * n_out,
                out_specs=out_specs, scratch_shapes=scratch),
            out_shape=[jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs],
            input_output_aliases={n_in + 1 + i: i for i in range(n_out)},
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
            cost_estimate=cost, interpret=interpret)(packed, *arrays)

    def run(*arrays):
        film = lambda xs: walk(call, xs[:3], xs[3 + n_in:], *xs[3:3 + n_in])
        return jax.lax.map(film, (*lists, *arrays, *init))

    return run


def _cost(heads, width, units, bq, bk, d, itemsize, tiles):
    """pl.CostEstimate of one chunk's call at its bound (`width` steps per head): what XLA's
    scheduler sees. The work done is the layout's (tests count it, not this estimate)."""
    pairs = heads * width
    return pl.CostEstimate(flops=units * pairs * bq * bk * d, transcendentals=pairs * bq * bk,
                           bytes_accessed=pairs * tiles * d * itemsize)


def _inputs(q, k, v, plan):
    """[B, L, H, D] -> padded [B, H, L_pad, D]; shot vectors as lane-dense rows [B, 1, L_pad]."""
    nq, nk = plan.kv_index.shape[1], plan.q_index.shape[1]
    bq, bk = plan.block_q, plan.block_kv
    tq = lambda x, n: _pad_to(jnp.swapaxes(x, 1, 2), n, axis=2)
    qs = plan.q_shot[:, None, :].astype(jnp.int32)
    ks = plan.k_shot[:, None, :].astype(jnp.int32)
    km = plan.k_summary[:, None, :].astype(jnp.int32)
    return tq(q, nq * bq), tq(k, nk * bk), tq(v, nk * bk), qs, ks, km


def _forward(q, k, v, plan, log_w, interpret):
    b, length, h, d = q.shape
    bq, bk = plan.block_q, plan.block_kv
    qt, kt, vt, qs, ks, km = _inputs(q, k, v, plan)
    sp = _specs(bq, bk, d, rows_first=True)
    kw = dict(mode=plan.mode, log_w=log_w, scale=1.0 / math.sqrt(d))
    width = chunk_width(plan.kv_index.shape[-1])
    init = (jnp.zeros(qt.shape, q.dtype), jnp.full((b, h, 1, qt.shape[2]), -jnp.inf, _F32))
    out, lse = _pass(
        functools.partial(_fwd_kernel, **kw), "shot_attention_fwd", h,
        (plan.kv_index, plan.kv_full, plan.kv_count),
        [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"], sp["ks"]], [sp["q"], sp["stat"]], init,
        [pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, d), _F32)],
        _cost(h, width, 4, bq, bk, d, q.dtype.itemsize, bq + 2 * bk), interpret,
    )(qt, kt, vt, qs, ks, km)
    return jnp.swapaxes(out, 1, 2)[:, :length], lse


def _backward(q, k, v, out, lse, plan, log_w, do, interpret):
    b, length, h, d = q.shape
    bq, bk = plan.block_q, plan.block_kv
    nq = plan.kv_index.shape[1]
    qt, kt, vt, qs, ks, km = _inputs(q, k, v, plan)
    dot = _pad_to(jnp.swapaxes(do, 1, 2), nq * bq, axis=2)
    delta = jnp.sum(dot.astype(_F32) * _pad_to(jnp.swapaxes(out, 1, 2), nq * bq, axis=2).astype(_F32),
                    axis=-1)[:, :, None]                      # [B, H, 1, L_pad] like lse
    kw = dict(mode=plan.mode, log_w=log_w, scale=1.0 / math.sqrt(d))
    args = (qt, kt, vt, qs, ks, km, dot, lse, delta)
    size = q.dtype.itemsize

    sp = _specs(bq, bk, d, rows_first=True)
    (dq,) = _pass(
        functools.partial(_dq_kernel, **kw), "shot_attention_dq", h,
        (plan.kv_index, plan.kv_full, plan.kv_count),
        [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"], sp["ks"], sp["q"], sp["stat"], sp["stat"]],
        [sp["q"]], (jnp.zeros(qt.shape, q.dtype),), [pltpu.VMEM((bq, d), _F32)],
        _cost(h, chunk_width(plan.kv_index.shape[-1]), 6, bq, bk, d, size, 3 * bq + 2 * bk),
        interpret)(*args)

    sp = _specs(bq, bk, d, rows_first=False)
    dk, dv = _pass(
        functools.partial(_dkv_kernel, **kw), "shot_attention_dkv", h,
        (plan.q_index, plan.q_full, plan.q_count),
        [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"], sp["ks"], sp["q"], sp["stat"], sp["stat"]],
        [sp["k"], sp["k"]], (jnp.zeros(kt.shape, k.dtype), jnp.zeros(vt.shape, v.dtype)),
        [pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, d), _F32)],
        _cost(h, chunk_width(plan.q_index.shape[-1]), 8, bq, bk, d, size, 3 * bq + 4 * bk),
        interpret)(*args)
    back = lambda x, n: jnp.swapaxes(x, 1, 2)[:, :n]
    return back(dq, length), back(dk, k.shape[1]), back(dv, v.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, plan, log_w, interpret):
    return _forward(q, k, v, plan, log_w, interpret)[0]


def _attend_fwd(q, k, v, plan, log_w, interpret):
    out, lse = _forward(q, k, v, plan, log_w, interpret)
    return out, (q, k, v, out, lse, plan)


def _attend_bwd(log_w, interpret, res, do):
    q, k, v, out, lse, plan = res
    dq, dk, dv = _backward(q, k, v, out, lse, plan, log_w, do, interpret)
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
    n, m = plan.kv_index.shape[1], plan.q_index.shape[1]
    if n >= _BLOCKS or m >= _BLOCKS:
        raise ValueError(f"{n} x {m} blocks exceed the packed step format ({_BLOCKS} per side)")
    log_w = math.log(summary_self_weight) if plan.mode == "sparse" else 0.0
    return _attend(q, k, v, plan, float(log_w), bool(interpret))
