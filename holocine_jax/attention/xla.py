"""Blocked shot attention in plain XLA over a BlockPlan (DESIGN §5): runs on every backend.

Forward: all q blocks advance together through their lists of active kv blocks (a while loop of
max(kv_count) steps, dynamic): gather the kv blocks, recompute the mask of each block pair from
per-token shot ids, online softmax in float32. Backward (custom VJP): dQ in the same row loop,
dK/dV in a loop over the transposed lists, both from the saved log-sum-exp (FlashAttention-2
style). Live memory per step is O(B * L * H * block) — never O(L^2).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from holocine_jax.attention.plan import BlockPlan
from holocine_jax.shots import own_summary, self_attention_allowed

_F32 = jnp.float32


def _to_blocks(x, n, block):
    """[B, L, H, D] -> [B, n, block, H, D] (zero padded)."""
    b, length, h, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, n * block - length), (0, 0), (0, 0)))
    return x.reshape(b, n, block, h, d)


def _gather(x, idx):
    """x: [B, n, ...] blocks; idx: [B, m] block ids -> [B, m, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _logits(qb, kb, sq, sk, mk, ok, plan, log_w, scale):
    """Masked, biased f32 logits of block pairs: [B, n, H, bq, bk].

    qb: [B, n, bq, H, D], kb: [B, n, bk, H, D]; sq: [B, n, bq]; sk, mk: [B, n, bk];
    ok: [B, n] whether the slot holds an active pair.
    """
    s = jnp.einsum("bnqhd,bnkhd->bnhqk", qb, kb, preferred_element_type=_F32) * scale
    sq, sk, mk = sq[..., :, None], sk[..., None, :], mk[..., None, :]
    allowed = self_attention_allowed(sq, sk, mk, plan.mode) & ok[..., None, None]
    if plan.mode == "sparse" and log_w != 0.0:
        s = s + log_w * own_summary(sq, sk, mk)[:, :, None].astype(_F32)
    return jnp.where(allowed[:, :, None], s, -jnp.inf)


def _slot(plan, j, q_major):
    """Block ids and validity of slot j of every row ([B, n] each)."""
    index, count = (plan.kv_index, plan.kv_count) if q_major else (plan.q_index, plan.q_count)
    j_safe = jnp.minimum(j, index.shape[-1] - 1)
    return index[:, :, j_safe], j < count


def _forward(q, k, v, plan, log_w):
    """Returns out [B, L, H, D] and lse [B, nq, H, bq] (f32, -inf for rows seeing nothing)."""
    b, length, h, d = q.shape
    nq, nk = plan.kv_index.shape[1], plan.q_index.shape[1]
    bq, bk, scale = plan.block_q, plan.block_kv, 1.0 / math.sqrt(d)
    qb, kb, vb = _to_blocks(q, nq, bq), _to_blocks(k, nk, bk), _to_blocks(v, nk, bk)
    sq = plan.q_shot.reshape(b, nq, bq)
    sk, mk = plan.k_shot.reshape(b, nk, bk), plan.k_summary.reshape(b, nk, bk)

    def body(carry):
        j, m, l, acc = carry
        idx, ok = _slot(plan, j, True)
        s = _logits(qb, _gather(kb, idx), sq, _gather(sk, idx), _gather(mk, idx), ok, plan,
                    log_w, scale)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + p.sum(-1)
        pv = jnp.einsum("bnhqk,bnkhd->bnhqd", p.astype(v.dtype), _gather(vb, idx),
                        preferred_element_type=_F32)
        return j + 1, m_new, l, alpha[..., None] * acc + pv

    init = (jnp.int32(0), jnp.full((b, nq, h, bq), -jnp.inf, _F32), jnp.zeros((b, nq, h, bq), _F32),
            jnp.zeros((b, nq, h, bq, d), _F32))
    steps = plan.kv_count.max()
    _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    out = jnp.einsum("bnhqd->bnqhd", out).reshape(b, nq * bq, h, d)[:, :length]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse


def _backward(q, k, v, out, lse, plan, log_w, do):
    """dq, dk, dv of `_forward` from the saved lse (two passes: rows, then columns)."""
    b, length, h, d = q.shape
    nq, nk = plan.kv_index.shape[1], plan.q_index.shape[1]
    bq, bk, scale = plan.block_q, plan.block_kv, 1.0 / math.sqrt(d)
    qb, dob = _to_blocks(q, nq, bq), _to_blocks(do, nq, bq)
    kb, vb = _to_blocks(k, nk, bk), _to_blocks(v, nk, bk)
    delta = jnp.einsum("bnqhd,bnqhd->bnhq", dob.astype(_F32), _to_blocks(out, nq, bq).astype(_F32))
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see nothing have p = 0 anyway
    sq = plan.q_shot.reshape(b, nq, bq)
    sk, mk = plan.k_shot.reshape(b, nk, bk), plan.k_summary.reshape(b, nk, bk)

    def ds_and_p(qx, kx, vx, dox, sqx, skx, mkx, ok, lsex, deltax):
        s = _logits(qx, kx, sqx, skx, mkx, ok, plan, log_w, scale)
        p = jnp.exp(s - lsex[..., None])
        dp = jnp.einsum("bnqhd,bnkhd->bnhqk", dox, vx, preferred_element_type=_F32)
        return p * (dp - deltax[..., None]), p

    def dq_body(carry):
        j, dq = carry
        idx, ok = _slot(plan, j, True)
        kx = _gather(kb, idx)
        ds, _ = ds_and_p(qb, kx, _gather(vb, idx), dob, sq, _gather(sk, idx), _gather(mk, idx),
                         ok, lse, delta)
        return j + 1, dq + jnp.einsum("bnhqk,bnkhd->bnqhd", ds.astype(k.dtype), kx,
                                      preferred_element_type=_F32)

    def dkv_body(carry):
        j, dk, dv = carry
        idx, ok = _slot(plan, j, False)
        qx, dox = _gather(qb, idx), _gather(dob, idx)
        ds, p = ds_and_p(qx, kb, vb, dox, _gather(sq, idx), sk, mk, ok, _gather(lse, idx),
                         _gather(delta, idx))
        dv = dv + jnp.einsum("bnhqk,bnqhd->bnkhd", p.astype(do.dtype), dox,
                             preferred_element_type=_F32)
        dk = dk + jnp.einsum("bnhqk,bnqhd->bnkhd", ds.astype(q.dtype), qx,
                             preferred_element_type=_F32)
        return j + 1, dk, dv

    rows, cols = plan.kv_count.max(), plan.q_count.max()
    _, dq = jax.lax.while_loop(lambda c: c[0] < rows, dq_body,
                               (jnp.int32(0), jnp.zeros(qb.shape, _F32)))
    zeros_kv = jnp.zeros(kb.shape, _F32)
    _, dk, dv = jax.lax.while_loop(lambda c: c[0] < cols, dkv_body,
                                   (jnp.int32(0), zeros_kv, zeros_kv))

    def unblock(x, n, block, like):
        return (x.reshape(b, n * block, h, d)[:, :length] * 1.0).astype(like.dtype)

    return (unblock(dq * scale, nq, bq, q), unblock(dk * scale, nk, bk, k),
            unblock(dv, nk, bk, v))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, plan, log_w):
    return _forward(q, k, v, plan, log_w)[0]


def _attend_fwd(q, k, v, plan, log_w):
    out, lse = _forward(q, k, v, plan, log_w)
    return out, (q, k, v, out, lse, plan)


def _attend_bwd(log_w, res, do):
    q, k, v, out, lse, plan = res
    dq, dk, dv = _backward(q, k, v, out, lse, plan, log_w, do)
    plan_ct = jax.tree.map(lambda x: None, plan)
    return dq, dk, dv, plan_ct


_attend.defvjp(_attend_fwd, _attend_bwd)


def shot_attention_xla(q, k, v, plan: BlockPlan, *, summary_self_weight=2.0):
    """Shot attention over a block plan. q, k, v: [B, L, H, D] -> [B, L, H, D].

    Differentiable w.r.t. q, k, v. `summary_self_weight` biases own-shot summary keys by log(w)
    in `sparse` plans (2.0 = the released checkpoints, 1.0 = the clean mask).
    """
    if q.shape[1] != plan.num_tokens:
        raise ValueError(f"sequence length {q.shape[1]} != layout tokens {plan.num_tokens}")
    log_w = math.log(summary_self_weight) if plan.mode == "sparse" else 0.0
    return _attend(q, k, v, plan, float(log_w))
