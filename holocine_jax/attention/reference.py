"""The definition of shot attention (DESIGN §5): dense masks from the ShotLayout predicates.

O(L^2) memory: for tests and tiny shapes only. Every executor must match these numbers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def shot_attention_reference(q, k, v, layout, *, mode="sparse", summary_self_weight=2.0):
    """softmax(q k^T / sqrt(D) + log(w)*[own-shot summary key] masked) v in float32.

    q, k, v: [B, L, H, D]; layout: batched ShotLayout (leading B). Returns [B, L, H, D] in q's
    dtype. The log(w) bias applies in `sparse` mode only (w = summary_self_weight).
    """
    d = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
    if mode == "sparse" and summary_self_weight != 1.0:
        logits = logits + math.log(summary_self_weight) * layout.own_summary_mask()[:, None]
    logits = jnp.where(layout.self_attention_mask(mode)[:, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)


def cross_attention_reference(q, k, v, layout):
    """Window cross-attention in float32: q [B, L, H, D], k/v [B, Lt, H, D] -> [B, L, H, D].

    Disallowed pairs are excluded exactly (-inf); every video token sees at least the global
    window, so this equals the official additive -1e4 to float32 precision.
    """
    d = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
    mask = layout.cross_attention_mask(k.shape[1])
    probs = jax.nn.softmax(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)
