"""Pallas GPU (Triton) kernels for shot attention over a BlockPlan (DESIGN §5).

    out = shot_attention_pallas_gpu(q, k, v, plan, summary_self_weight=2.0)   # [B, L, H, D]

Forward: one program per (batch, head, q block) loops (`fori_loop`) over that block's active kv
blocks only (kv_index / kv_count of the plan), slicing K/V at dynamic offsets; online softmax in
float32; returns the log-sum-exp for the backward. Masking: a partial block recomputes its mask
from per-token shot ids and summary flags; a full block skips the mask (and the own-summary bias
when it holds no summary key) through a branch. dQ runs the same row loop from the saved
log-sum-exp; dK/dV: one program per tile of <= 64 keys of a kv block loops over the transposed
list (q_index / q_count) in slices of <= 64 query rows. No [L, L] array exists. Triton needs power-of-two blocks and head dims >= 16; float32 inputs
use TF32 matmuls on the GPU (jax's default precision there), the interpreter computes in f32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from holocine_jax.attention.plan import BlockPlan
from holocine_jax.shots import own_summary, self_attention_allowed

_F32 = jnp.float32
# dK/dV tiles: a program owns <= _DKV_TILE keys and steps <= _DKV_TILE query rows at a time, so
# its two f32 accumulators fit the registers at head dim 128 (ptxas for sm_90: no spills).
_DKV_TILE = 64


def _dot(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=_F32)


def _logits(q, k, qs, ks, km, full, *, mode, log_w, scale):
    """f32 logits [bq, bk] of one block pair with mask and bias: q [bq, D], k [bk, D]; shot ids
    qs [bq, 1], ks [1, bk]; summary flags km [1, bk] (int). Full blocks that need no bias take
    the branch without elementwise work."""
    s = _dot(q, k, ((1,), (1,))) * scale
    biased = mode == "sparse" and log_w != 0.0
    plain = (full != 0) & (jnp.max(km) == 0) if biased else full != 0

    def masked(s):
        summary = km != 0
        if biased:
            s = s + log_w * own_summary(qs, ks, summary).astype(_F32)
        return jnp.where(self_attention_allowed(qs, ks, summary, mode) | (full != 0), s, -jnp.inf)

    return jax.lax.cond(plain, lambda s: s, masked, s)


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref, idx_ref, full_ref, cnt_ref,
                o_ref, lse_ref, *, bk, **kw):
    q, qs = q_ref[...], qs_ref[...][:, None]
    bq, d = q.shape

    def body(j, carry):
        m, l, acc = carry
        kv = pl.ds(idx_ref[j] * bk, bk)
        k, v = k_ref[kv, :], v_ref[kv, :]
        s = _logits(q, k, qs, ks_ref[kv][None, :], km_ref[kv][None, :], full_ref[j], **kw)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, ((1,), (0,)))
        return m_new, alpha * l + p.sum(axis=-1), acc

    init = (jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32), jnp.zeros((bq, d), _F32))
    m, l, acc = jax.lax.fori_loop(0, cnt_ref[0], body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref, idx_ref, full_ref, cnt_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, bk, **kw):
    q, qs, do, delta = q_ref[...], qs_ref[...][:, None], do_ref[...], delta_ref[...]
    lse = lse_ref[...]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see nothing have p = 0 anyway

    def body(j, dq):
        kv = pl.ds(idx_ref[j] * bk, bk)
        k, v = k_ref[kv, :], v_ref[kv, :]
        s = _logits(q, k, qs, ks_ref[kv][None, :], km_ref[kv][None, :], full_ref[j], **kw)
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(do, v, ((1,), (1,))) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, ((1,), (0,)))

    dq = jax.lax.fori_loop(0, cnt_ref[0], body, jnp.zeros(q.shape, _F32))
    dq_ref[...] = (dq * kw["scale"]).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, km_ref, idx_ref, full_ref, cnt_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, bq, sub, **kw):
    """Steps through each listed q block in `sub`-row slices (smaller [sub, bk] tiles)."""
    k, v, ks, km = k_ref[...], v_ref[...], ks_ref[...][None, :], km_ref[...][None, :]
    per_block = bq // sub

    def body(t, carry):
        dk, dv = carry
        j, part = jax.lax.div(t, per_block), jax.lax.rem(t, per_block)
        rows = pl.ds(idx_ref[j] * bq + part * sub, sub)
        q, do, lse = q_ref[rows, :], do_ref[rows, :], lse_ref[rows]
        s = _logits(q, k, qs_ref[rows][:, None], ks, km, full_ref[j], **kw)
        p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, ((0,), (0,)))
        ds = p * (_dot(do, v, ((1,), (1,))) - delta_ref[rows][:, None])
        return dk + _dot(ds.astype(q.dtype), q, ((0,), (0,))), dv

    zeros = jnp.zeros(k.shape, _F32)
    dk, dv = jax.lax.fori_loop(0, cnt_ref[0] * per_block, body, (zeros, zeros))
    dk_ref[...] = (dk * kw["scale"]).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls
def _heads_first(x, length):
    """[B, L, H, D] -> [B, H, length, D], zero padded (length >= L: the plan's padded size)."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def _tokens_first(x, length):
    """[B, H, L_pad, D] -> [B, length, H, D]."""
    return jnp.swapaxes(x, 1, 2)[:, :length]


def _call(kernel, plan, d, by_rows, inputs, outputs, interpret):
    """One pallas_call over grid (B, H, tiles of the program's own side). by_rows: programs own
    a q block and loop over kv blocks (fwd, dQ); else they own a tile of <= _DKV_TILE keys of a
    kv block and loop over its q blocks (dK/dV). The looped-over side is passed whole and sliced
    in the kernel. inputs: q, k, v, q_shot, k_shot, k_summary, the three list arrays, then
    (backward) dO, lse, delta. 8 warps unless every tile dimension is <= 64."""
    bq, bk = plan.block_q, plan.block_kv
    split = 1 if by_rows else bk // min(bk, _DKV_TILE)  # tiles per kv block
    bk = bk // split
    lq, lk = plan.q_shot.shape[1], plan.k_shot.shape[1]
    b, h = inputs[0].shape[:2]
    tile = lambda n: pl.BlockSpec((None, None, n, d), lambda b, h, i: (b, h, i, 0))
    whole = lambda n: pl.BlockSpec((None, None, n, d), lambda b, h, i: (b, h, 0, 0))
    vec_tile = lambda n: pl.BlockSpec((None, n), lambda b, h, i: (b, i))
    vec_whole = lambda n: pl.BlockSpec((None, n), lambda b, h, i: (b, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    row_whole = pl.BlockSpec((None, None, lq), lambda b, h, i: (b, h, 0))
    width = inputs[6].shape[2]
    lists = [pl.BlockSpec((None, None, width), lambda b, h, i: (b, i // split, 0))] * 2 + [
        pl.BlockSpec((None, None, 1), lambda b, h, i: (b, i // split, 0))]
    if by_rows:
        q, kv, qs, ks, stat = tile(bq), whole(lk), vec_tile(bq), vec_whole(lk), row_tile
    else:
        q, kv, qs, ks, stat = whole(lq), tile(bk), vec_whole(lq), vec_tile(bk), row_whole
    in_specs = [q, kv, kv, qs, ks, ks, *lists, q, stat, stat][:len(inputs)]
    return pl.pallas_call(
        kernel, grid=(b, h, lq // bq if by_rows else lk // bk), in_specs=in_specs,
        out_specs=[{"q": q, "kv": kv, "stat": stat}[name] for name, _ in outputs],
        out_shape=[shape for _, shape in outputs], interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4 if max(bq, bk, d) <= 64 else 8,
                                                num_stages=2),
    )(*inputs)


def _plan_inputs(plan, transposed):
    """Per-token vectors and the (index, full, count) lists, as int32 kernel inputs."""
    lists = ((plan.q_index, plan.q_full, plan.q_count) if transposed
             else (plan.kv_index, plan.kv_full, plan.kv_count))
    return (plan.q_shot, plan.k_shot, plan.k_summary.astype(jnp.int32), lists[0],
            lists[1].astype(jnp.int32), lists[2][..., None])


def _forward(q, k, v, plan, log_w, interpret):
    """out [B, L, H, D] and lse [B, H, L_pad] (f32, -inf for rows that see nothing)."""
    lq, lk = plan.q_shot.shape[1], plan.k_shot.shape[1]
    qt, kt, vt = _heads_first(q, lq), _heads_first(k, lk), _heads_first(v, lk)
    kw = dict(mode=plan.mode, log_w=log_w, scale=1.0 / math.sqrt(q.shape[-1]))
    kernel = functools.partial(_fwd_kernel, bk=plan.block_kv, **kw)
    out, lse = _call(kernel, plan, q.shape[-1], True,
                     (qt, kt, vt, *_plan_inputs(plan, False)),
                     [("q", jax.ShapeDtypeStruct(qt.shape, q.dtype)),
                      ("stat", jax.ShapeDtypeStruct(qt.shape[:3], _F32))], interpret)
    return _tokens_first(out, q.shape[1]), lse


def _backward(q, k, v, out, lse, plan, log_w, do, interpret):
    lq, lk, d = plan.q_shot.shape[1], plan.k_shot.shape[1], q.shape[-1]
    qt, dot, kt, vt = (_heads_first(x, n) for x, n in ((q, lq), (do, lq), (k, lk), (v, lk)))
    delta = jnp.sum(dot.astype(_F32) * _heads_first(out, lq).astype(_F32), axis=-1)
    kw = dict(mode=plan.mode, log_w=log_w, scale=1.0 / math.sqrt(d))
    (dq,) = _call(functools.partial(_dq_kernel, bk=plan.block_kv, **kw), plan, d, True,
                  (qt, kt, vt, *_plan_inputs(plan, False), dot, lse, delta),
                  [("q", jax.ShapeDtypeStruct(qt.shape, q.dtype))], interpret)
    sub = min(plan.block_q, _DKV_TILE)
    dk, dv = _call(functools.partial(_dkv_kernel, bq=plan.block_q, sub=sub, **kw), plan, d, False,
                   (qt, kt, vt, *_plan_inputs(plan, True), dot, lse, delta),
                   [("kv", jax.ShapeDtypeStruct(kt.shape, k.dtype)),
                    ("kv", jax.ShapeDtypeStruct(vt.shape, v.dtype))], interpret)
    return tuple(_tokens_first(g, x.shape[1]) for g, x in ((dq, q), (dk, k), (dv, v)))


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
    [B, Lk, H, D] (Lk = the plan's key tokens) -> [B, L, H, D]. Differentiable w.r.t. q, k, v.
    `summary_self_weight` biases own-shot summary keys by log(w) in sparse plans.
    `interpret=True` runs the Pallas interpreter (any backend)."""
    if q.shape[1] != plan.num_tokens:
        raise ValueError(f"sequence length {q.shape[1]} != plan tokens {plan.num_tokens}")
    nk, bk = plan.q_index.shape[1], plan.block_kv
    fits = (nk - 1) * bk < k.shape[1] <= nk * bk
    if k.shape != v.shape or k.shape[0::2] != q.shape[0::2] or not fits:
        raise ValueError(f"keys {k.shape} / values {v.shape} do not fit queries {q.shape} and the "
                         f"plan's {nk} kv blocks of {bk} tokens")
    for name, size in (("block_q", plan.block_q), ("block_kv", bk), ("head_dim", q.shape[-1])):
        if size < 16 or size & (size - 1):
            raise ValueError(f"Triton needs powers of two >= 16: {name}={size}")
    log_w = math.log(summary_self_weight) if plan.mode == "sparse" else 0.0
    return _attend(q, k, v, plan, float(log_w), bool(interpret))
