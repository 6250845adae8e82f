"""Blocked attention in plain XLA (DESIGN §5): runs on every backend; the CPU executors.

`dense_attention_xla`: plain softmax(q k^T / sqrt(D)) v (no mask), for `full` mode and
`layout=None`, in fixed chunks: the forward maps over q chunks and scans their kv chunks with an
online softmax; the backward (custom VJP, from the saved log-sum-exp) scans kv chunks and, inside,
q chunks (dK/dV accumulate in the carry, dQ chunks pass through). Live memory is one
[B, H, chunk_q, chunk_kv] tile: no [L, L] buffer, so the tile stays in cache and XLA:CPU runs it
~2x faster than `jax.nn.dot_product_attention`, which materialises the logits.

`shot_attention_xla`: shot attention over a BlockPlan. Forward: all q blocks advance together through their lists of active kv blocks (a while loop of
max(kv_count) steps, dynamic): gather the kv blocks, recompute the mask of each block pair from
per-token shot ids, online softmax in float32. Backward (custom VJP): the same row loop from the
saved log-sum-exp (FlashAttention-2 style) computes dQ and scatter-adds dK/dV into their kv
blocks. Live memory per step is O(B * L * H * block) — never O(L^2).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from holocine_jax.attention.plan import BlockPlan
from holocine_jax.shots import own_summary, self_attention_allowed

_F32 = jnp.float32


def _chunks(x, block):
    """[B, L, H, D] -> [n, B, H, block, D], zero padded (n = ceil(L / block))."""
    b, length, h, d = x.shape
    n = -(-length // block)
    x = jnp.pad(x, ((0, 0), (0, n * block - length), (0, 0), (0, 0)))
    return x.reshape(b, n, block, h, d).transpose(1, 0, 3, 2, 4)


def _unchunk(x, length):
    """[n, B, H, block, D] -> [B, length, H, D]."""
    n, b, h, block, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, n * block, h, d)[:, :length]


def _row_chunks(x, block):
    """[B, H, L] row statistics -> [n, B, H, block] (zero padded)."""
    b, h, length = x.shape
    n = -(-length // block)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, n * block - length)))
    return x.reshape(b, h, n, block).transpose(2, 0, 1, 3)


def _key_bias(length, n, block):
    """[n, block] f32: 0 on real keys, -inf on the padding of the last chunk; None if none."""
    if n * block == length:
        return None
    return jnp.where(jnp.arange(n * block) < length, 0.0, -jnp.inf).astype(_F32).reshape(n, block)


def _dense_logits(qc, kc, bias, scale):
    """[B, H, cq, ck] f32 logits of one chunk pair (+ the padded keys' -inf)."""
    s = jnp.einsum("bhqd,bhkd->bhqk", qc, kc, preferred_element_type=_F32) * scale
    return s if bias is None else s + bias


def _dense_forward(q, k, v, block_q, block_kv):
    """out [B, Lq, H, D] and lse [B, H, Lq] (f32)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    kc, vc = _chunks(k, block_kv), _chunks(v, block_kv)
    bias = _key_bias(lk, kc.shape[0], block_kv)

    def row(qc):
        def step(carry, kv):
            m, l, acc = carry
            kj, vj, bj = kv
            s = _dense_logits(qc, kj, bj, scale)
            m_new = jnp.maximum(m, s.max(-1))   # finite from the first chunk on (>= 1 real key)
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vj, preferred_element_type=_F32)
            return (m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv), None

        init = (jnp.full((b, h, block_q), -jnp.inf, _F32), jnp.zeros((b, h, block_q), _F32),
                jnp.zeros((b, h, block_q, d), _F32))
        (m, l, acc), _ = jax.lax.scan(step, init, (kc, vc, bias))
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    out, lse = jax.lax.map(row, _chunks(q, block_q))
    lse = lse.transpose(1, 2, 0, 3).reshape(b, h, -1)[..., :lq]
    return _unchunk(out, lq), lse


def _dense_backward(q, k, v, out, lse, do, block_q, block_kv):
    """dq, dk, dv of `_dense_forward` from its lse: kv chunks outside, q chunks inside."""
    lq, lk, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    qc, doc = _chunks(q, block_q), _chunks(do, block_q)
    kc, vc = _chunks(k, block_kv), _chunks(v, block_kv)
    bias = _key_bias(lk, kc.shape[0], block_kv)
    delta = jnp.einsum("blhd,blhd->bhl", do.astype(_F32), out.astype(_F32))
    rows = (qc, doc, _row_chunks(lse, block_q), _row_chunks(delta, block_q))

    def column(dq, kv):
        kj, vj, bj = kv

        def step(carry, row):
            dk, dv = carry
            (qi, doi, lse_i, delta_i), dqi = row
            p = jnp.exp(_dense_logits(qi, kj, bj, scale) - lse_i[..., None])
            dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vj, preferred_element_type=_F32)
            ds = p * (dp - delta_i[..., None])
            dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(do.dtype), doi,
                                 preferred_element_type=_F32)
            dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q.dtype), qi,
                                 preferred_element_type=_F32)
            dqi = dqi + jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k.dtype), kj,
                                   preferred_element_type=_F32)
            return (dk, dv), dqi

        zeros = jnp.zeros(kj.shape, _F32)
        (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), (rows, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(column, jnp.zeros(qc.shape, _F32), (kc, vc, bias))
    return (_unchunk(dq * scale, lq).astype(q.dtype), _unchunk(dk * scale, lk).astype(k.dtype),
            _unchunk(dv, lk).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense(q, k, v, block_q, block_kv):
    return _dense_forward(q, k, v, block_q, block_kv)[0]


def _dense_fwd(q, k, v, block_q, block_kv):
    out, lse = _dense_forward(q, k, v, block_q, block_kv)
    return out, (q, k, v, out, lse)


def _dense_bwd(block_q, block_kv, res, do):
    return _dense_backward(*res, do, block_q, block_kv)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_attention_xla(q, k, v, *, block_q=512, block_kv=2048):
    """softmax(q k^T / sqrt(D)) v with float32 statistics. q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
    Returns [B, Lq, H, D] in q's dtype; differentiable w.r.t. q, k, v (memory O(L), not O(L^2)).

    block_q, block_kv: chunk sizes, clipped to the lengths (one chunk pair when both fit).
    """
    block_q, block_kv = min(block_q, q.shape[1]), min(block_kv, k.shape[1])
    return _dense(q, k, v, block_q, block_kv)


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


def _slot(plan, j):
    """Kv block ids and validity of slot j of every q block ([B, nq] each)."""
    j_safe = jnp.minimum(j, plan.kv_index.shape[-1] - 1)
    return plan.kv_index[:, :, j_safe], j < plan.kv_count


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
        idx, ok = _slot(plan, j)
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
    """dq, dk, dv of `_forward` from the saved lse, in one pass over the q-block rows.

    dK/dV of each step are scatter-added into their kv blocks: summary kv blocks are active for
    every q block, so a column-major pass (the transposed lists) would step nq times — dense.
    """
    b, length, h, d = q.shape
    nq, nk = plan.kv_index.shape[1], plan.q_index.shape[1]
    bq, bk, scale = plan.block_q, plan.block_kv, 1.0 / math.sqrt(d)
    qb, dob = _to_blocks(q, nq, bq), _to_blocks(do, nq, bq)
    kb, vb = _to_blocks(k, nk, bk), _to_blocks(v, nk, bk)
    delta = jnp.einsum("bnqhd,bnqhd->bnhq", dob.astype(_F32), _to_blocks(out, nq, bq).astype(_F32))
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see nothing have p = 0 anyway
    sq = plan.q_shot.reshape(b, nq, bq)
    sk, mk = plan.k_shot.reshape(b, nk, bk), plan.k_summary.reshape(b, nk, bk)
    batch = jnp.arange(b)[:, None]

    def body(carry):
        j, dq, dk, dv = carry
        idx, ok = _slot(plan, j)
        kx, vx = _gather(kb, idx), _gather(vb, idx)
        s = _logits(qb, kx, sq, _gather(sk, idx), _gather(mk, idx), ok, plan, log_w, scale)
        p = jnp.exp(s - lse[..., None])
        dp = jnp.einsum("bnqhd,bnkhd->bnhqk", dob, vx, preferred_element_type=_F32)
        ds = p * (dp - delta[..., None])
        dq = dq + jnp.einsum("bnhqk,bnkhd->bnqhd", ds.astype(k.dtype), kx,
                             preferred_element_type=_F32)
        dv_j = jnp.einsum("bnhqk,bnqhd->bnkhd", p.astype(do.dtype), dob, preferred_element_type=_F32)
        dk_j = jnp.einsum("bnhqk,bnqhd->bnkhd", ds.astype(q.dtype), qb, preferred_element_type=_F32)
        return j + 1, dq, dk.at[batch, idx].add(dk_j), dv.at[batch, idx].add(dv_j)

    zeros_kv = jnp.zeros(kb.shape, _F32)
    init = (jnp.int32(0), jnp.zeros(qb.shape, _F32), zeros_kv, zeros_kv)
    steps = plan.kv_count.max()
    _, dq, dk, dv = jax.lax.while_loop(lambda c: c[0] < steps, body, init)

    def unblock(x, n, block, like):
        return x.reshape(b, n * block, h, d)[:, :like.shape[1]].astype(like.dtype)

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
    """Shot attention over a block plan. q: [B, L, H, D]; k, v: [B, Lk, H, D] (Lk = L for a
    film's plan, other key sets for `make_token_plan`). Returns [B, L, H, D].

    Differentiable w.r.t. q, k, v. `summary_self_weight` biases own-shot summary keys by log(w)
    in `sparse` plans (2.0 = the released checkpoints, 1.0 = the clean mask).
    """
    if q.shape[1] != plan.num_tokens:
        raise ValueError(f"sequence length {q.shape[1]} != layout tokens {plan.num_tokens}")
    log_w = math.log(summary_self_weight) if plan.mode == "sparse" else 0.0
    return _attend(q, k, v, plan, float(log_w))
