"""The one entry point for attention in the model.

Every attention call site in `model/` goes through `shot_attention` (video self-attention) or
`cross_attention` (video -> text). The choice of executor lives here and nowhere else.
"""
from __future__ import annotations

import jax


def shot_attention(q, k, v, layout=None, *, mode="sparse", impl="auto",
                   summary_self_weight=2.0, interpret=False):
    """Self-attention over the concatenated film.

    q, k, v: [B, L, H, D] with L = num_latent_frames * h * w. Returns [B, L, H, D].
    `layout=None` means one shot covering the film: plain full attention (Wan).
    """
    del mode, impl, summary_self_weight, interpret
    if layout is not None:
        raise ValueError("shot layouts are not supported by this build of the attention dispatch")
    return jax.nn.dot_product_attention(q, k, v)


def cross_attention(q, k, v, layout=None):
    """Video -> text attention. q: [B, L, H, D]; k, v: [B, Lt, H, D]. Returns [B, L, H, D].

    `layout=None` (or a layout without text windows) means every token sees all text.
    """
    if layout is not None:
        raise ValueError("text windows are not supported by this build of the attention dispatch")
    return jax.nn.dot_product_attention(q, k, v)
