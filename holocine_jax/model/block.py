"""One Wan DiT block: modulated self-attention, cross-attention, modulated FFN (DESIGN §4)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from holocine_jax.attention import AttentionSpec, attend, cross_attention
from holocine_jax.model.layers import (FeedForward, dense, layer_norm, linear, modulation_table,
                                       rms_norm)
from holocine_jax.model.rope import apply_rope


class WanAttention(nnx.Module):
    """diffusers `WanAttention`: `to_q/to_k/to_v`, `to_out.0`, RMS `norm_q/norm_k` across heads.

    With a `spec` it is self-attention: q, k rotate with RoPE and go through `attend` (the spec,
    and `rules` for a mesh that splits the sequence). Without one it is cross-attention: it reads
    `context` [B, Lt, dim] through `cross_attention` (text windows).
    """

    def __init__(self, dim: int, num_heads: int, *, eps: float, spec: AttentionSpec | None = None,
                 rules=(), dtype, param_dtype, rngs: nnx.Rngs, lora=None, name="attn1"):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
        self.num_heads = num_heads
        self.spec, self.rules = spec, rules
        self.to_q = dense(dim, dim, ("embed", "heads"), name=f"{name}.to_q", **kw)
        self.to_k = dense(dim, dim, ("embed", "heads"), name=f"{name}.to_k", **kw)
        self.to_v = dense(dim, dim, ("embed", "heads"), name=f"{name}.to_v", **kw)
        self.to_out = nnx.List([dense(dim, dim, ("heads", "embed"), name=f"{name}.to_out.0", **kw)])
        self.norm_q = rms_norm(dim, "heads", eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.norm_k = rms_norm(dim, "heads", eps=eps, param_dtype=param_dtype, rngs=rngs)

    def _heads(self, x):
        """[B, L, H*D] -> [B, L, H, D]."""
        return x.reshape(*x.shape[:2], self.num_heads, -1)

    def __call__(self, x, context=None, *, rope=None, layout=None, gate=None):
        """x: [B, L, dim] video tokens; context: [B, Lt, dim] text (cross-attention only);
        gate: LoRA gate [B, L, r] (lora.py). Returns [B, L, dim]."""
        if (self.spec is None) == (context is None):
            raise ValueError("self-attention (a spec) takes no context; cross-attention needs one")
        source = x if context is None else context
        dtype = self.to_q.dtype or x.dtype
        q = self._heads(self.norm_q(linear(self.to_q, x, gate)).astype(dtype))
        k = self._heads(self.norm_k(linear(self.to_k, source, gate)).astype(dtype))
        v = self._heads(linear(self.to_v, source, gate))
        if self.spec is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            out = attend(q, k, v, layout, self.spec, self.rules)
        else:
            out = cross_attention(q, k, v, layout)
        return linear(self.to_out[0], out.reshape(x.shape[0], x.shape[1], -1), gate)


class WanTransformerBlock(nnx.Module):
    """Block with diffusers' names: norm1/attn1 (self), norm2/attn2 (cross), norm3/ffn.

    The residual stream stays float32 (as the official code); sub-layers run in `dtype`.
    """

    def __init__(self, m, spec: AttentionSpec, rules, *, rngs: nnx.Rngs, lora=None):
        dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
        norm = dict(eps=m.eps, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.norm1 = layer_norm(m.dim, affine=False, **norm)
        self.attn1 = WanAttention(m.dim, m.num_heads, eps=m.eps, spec=spec, rules=rules, **kw)
        self.attn2 = WanAttention(m.dim, m.num_heads, eps=m.eps, name="attn2", **kw)
        self.norm2 = layer_norm(m.dim, affine=True, **norm) if m.cross_attn_norm else None
        self.ffn = FeedForward(m.dim, m.ffn_dim, **kw)
        self.norm3 = layer_norm(m.dim, affine=False, **norm)
        self.scale_shift_table = modulation_table(6, m.dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, context, t_mod, rope, layout=None, gate=None):
        """x: [B, L, dim] float32; context: [B, Lt, dim]; t_mod: [B, 6, dim] float32; gate:
        LoRA gate [B, L, r] or None (lora.py)."""
        mod = self.scale_shift_table[...].astype(jnp.float32) + t_mod
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = jnp.split(mod, 6, axis=1)
        h = (self.norm1(x) * (1 + scale_sa) + shift_sa).astype(self.dtype)
        x = x + self.attn1(h, rope=rope, layout=layout, gate=gate).astype(jnp.float32) * gate_sa
        h = (x if self.norm2 is None else self.norm2(x)).astype(self.dtype)
        x = x + self.attn2(h, context, layout=layout, gate=gate).astype(jnp.float32)
        h = (self.norm3(x) * (1 + scale_ff) + shift_ff).astype(self.dtype)
        return x + self.ffn(h, gate).astype(jnp.float32) * gate_ff
