"""Pallas GPU (Triton) kernels for shot attention over a BlockPlan (DESIGN §5).

    out = shot_attention_pallas_gpu(q, k, v, plan, summary_self_weight=2.0)   # [B, L, H, D]

One program per (batch, head, q block) loops (`fori_loop`) over that block's active kv blocks
only, reading the plan's list (kv_index / kv_count) and slicing K/V with dynamic offsets; the
mask of a partial block is recomputed from per-token shot ids, full blocks skip it. dQ runs the
same row loop from the saved log-sum-exp; dK/dV one program per kv block loops over the
transposed list (q_index / q_count). Online softmax and accumulation in float32. Blocks must be
powers of two (Triton tensors). Same numbers as `pallas_tpu.py` (the shared `block_logits`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from holocine_jax.attention.pallas_tpu import block_logits
from holocine_jax.attention.plan import BlockPlan

_F32 = jnp.float32


def _dot(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=_F32)


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref, idx_ref, full_ref, cnt_ref,
                o_ref, lse_ref, *, bk, **kw):
    q, qs = q_ref[...], qs_ref[...][:, None]
    bq, d = q.shape

    def body(j, carry):
        m, l, acc = carry
        start = idx_ref[j] * bk
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        s = block_logits(q, k, qs, ks_ref[pl.ds(start, bk)][None, :],
                         km_ref[pl.ds(start, bk)][None, :] != 0, full_ref[j], **kw)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, ((1,), (0,)))
        return m_new, alpha * l + p.sum(axis=-1), acc

    init = (jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32), jnp.zeros((bq, d), _F32))
    m, l, acc = jax.lax.fori_loop(0, cnt_ref[0], body, init)
    seen = l > 0
    o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref, idx_ref, full_ref, cnt_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, bk, **kw):
    q, qs, do = q_ref[...], qs_ref[...][:, None], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def body(j, dq):
        start = idx_ref[j] * bk
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        s = block_logits(q, k, qs, ks_ref[pl.ds(start, bk)][None, :],
                         km_ref[pl.ds(start, bk)][None, :] != 0, full_ref[j], **kw)
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(do, v, ((1,), (1,))) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, ((1,), (0,)))

    dq = jax.lax.fori_loop(0, cnt_ref[0], body, jnp.zeros(q.shape, _F32))
    dq_ref[...] = (dq * kw["scale"]).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref, idx_ref, full_ref, cnt_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, bq, **kw):
    k, v = k_ref[...], v_ref[...]
    ks, km = ks_ref[...][None, :], km_ref[...][None, :] != 0

    def body(j, carry):
        dk, dv = carry
        start = idx_ref[j] * bq
        q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
        lse = lse_ref[pl.ds(start, bq)]
        s = block_logits(q, k, qs_ref[pl.ds(start, bq)][:, None], ks, km, full_ref[j], **kw)
        p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, ((0,), (0,)))
        ds = p * (_dot(do, v, ((1,), (1,))) - delta_ref[pl.ds(start, bq)][:, None])
        return dk + _dot(ds.astype(q.dtype), q, ((0,), (0,))), dv

    zeros = jnp.zeros(k.shape, _F32)
    dk, dv = jax.lax.fori_loop(0, cnt_ref[0], body, (zeros, zeros))
    dk_ref[...] = (dk * kw["scale"]).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls
def _layout(q, k, v, plan):
    """[B, L, H, D] -> padded [B, H, L_pad, D]."""
    nq, nk = plan.kv_index.shape[1], plan.q_index.shape[1]
    pad = lambda x, n: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, n - x.shape[1]), (0, 0)))
    return pad(q, nq * plan.block_q), pad(k, nk * plan.block_kv), pad(v, nk * plan.block_kv)


def _specs(plan, d, by_rows: bool):
    """Blocks of the looped-over side are whole (sliced in the kernel); the program's own side
    is one block. by_rows: programs over q blocks (fwd, dQ); else over kv blocks (dK/dV)."""
    bq, bk = plan.block_q, plan.block_kv
    lq, lk = plan.q_shot.shape[1], plan.k_shot.shape[1]
    n_list = plan.kv_index.shape[2] if by_rows else plan.q_index.shape[2]
    own = lambda block: pl.BlockSpec((None, None, block, d), lambda b, h, i: (b, h, i, 0))
    whole = lambda length: pl.BlockSpec((None, None, length, d), lambda b, h, i: (b, h, 0, 0))
    vec_own = lambda block: pl.BlockSpec((None, block), lambda b, h, i: (b, i))
    vec_whole = lambda length: pl.BlockSpec((None, length), lambda b, h, i: (b, 0))
    stat_own = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    stat_whole = pl.BlockSpec((None, None, lq), lambda b, h, i: (b, h, 0))
    lists = [pl.BlockSpec((None, None, n_list), lambda b, h, i: (b, i, 0))] * 2 + [
        pl.BlockSpec((None, None, 1), lambda b, h, i: (b, i, 0))]
    if by_rows:
        return dict(q=own(bq), k=whole(lk), qs=vec_own(bq), ks=vec_whole(lk), lists=lists,
                    stat=stat_own)
    return dict(q=whole(lq), k=own(bk), qs=vec_whole(lq), ks=vec_own(bk), lists=lists,
                stat=stat_whole)


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret,
                          compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))


def _forward(q, k, v, plan, log_w, interpret):
    b, length, h, d = q.shape
    nq = plan.kv_index.shape[1]
    qt, kt, vt = _layout(q, k, v, plan)
    sp = _specs(plan, d, by_rows=True)
    kw = dict(mode=plan.mode, log_w=log_w, scale=1.0 / math.sqrt(d))
    lists = (plan.kv_index, plan.kv_full.astype(jnp.int32), plan.kv_count[..., None])
    out, lse = _call(functools.partial(_fwd_kernel, bk=plan.block_kv, **kw), (b, h, nq),
                     [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"], sp["ks"], *sp["lists"]],
                     [sp["q"], sp["stat"]],
                     [jax.ShapeDtypeStruct(qt.shape, q.dtype),
                      jax.ShapeDtypeStruct((b, h, qt.shape[2]), _F32)], interpret)(
        qt, kt, vt, plan.q_shot, plan.k_shot, plan.k_summary.astype(jnp.int32), *lists)
    return jnp.swapaxes(out, 1, 2)[:, :length], lse


def _backward(q, k, v, out, lse, plan, log_w, do, interpret):
    b, length, h, d = q.shape
    nq, nk = plan.kv_index.shape[1], plan.q_index.shape[1]
    qt, kt, vt = _layout(q, k, v, plan)
    dot = _layout(do, do, do, plan)[0]
    delta = jnp.sum(dot.astype(_F32) * _layout(out, out, out, plan)[0].astype(_F32), axis=-1)
    kw = dict(mode=plan.mode, log_w=log_w, scale=1.0 / math.sqrt(d))
    vectors = (plan.q_shot, plan.k_shot, plan.k_summary.astype(jnp.int32))

    sp = _specs(plan, d, by_rows=True)
    rows = (plan.kv_index, plan.kv_full.astype(jnp.int32), plan.kv_count[..., None])
    dq = _call(functools.partial(_dq_kernel, bk=plan.block_kv, **kw), (b, h, nq),
               [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"], sp["ks"], *sp["lists"],
                sp["q"], sp["stat"], sp["stat"]], sp["q"],
               jax.ShapeDtypeStruct(qt.shape, q.dtype), interpret)(
        qt, kt, vt, *vectors, *rows, dot, lse, delta)

    sp = _specs(plan, d, by_rows=False)
    cols = (plan.q_index, plan.q_full.astype(jnp.int32), plan.q_count[..., None])
    dk, dv = _call(functools.partial(_dkv_kernel, bq=plan.block_q, **kw), (b, h, nk),
                   [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"], sp["ks"], *sp["lists"],
                    sp["q"], sp["stat"], sp["stat"]], [sp["k"], sp["k"]],
                   [jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
                   interpret)(qt, kt, vt, *vectors, *cols, dot, lse, delta)
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


def shot_attention_pallas_gpu(q, k, v, plan: BlockPlan, *, summary_self_weight=2.0,
                              interpret=False):
    """Shot attention over a block plan with the Triton kernels. q: [B, L, H, D]; k, v:
    [B, Lk, H, D] -> [B, L, H, D]. `interpret=True` runs the Pallas interpreter (any backend)."""
    if q.shape[1] != plan.num_tokens:
        raise ValueError(f"sequence length {q.shape[1]} != plan tokens {plan.num_tokens}")
    for name, size in (("block_q", plan.block_q), ("block_kv", plan.block_kv), ("head_dim", q.shape[-1])):
        if size & (size - 1):
            raise ValueError(f"Triton needs powers of two: {name}={size}")
    log_w = math.log(summary_self_weight) if plan.mode == "sparse" else 0.0
    return _attend(q, k, v, plan, float(log_w), bool(interpret))
