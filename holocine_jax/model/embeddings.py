"""Time and text conditioning of the Wan DiT (diffusers' `WanTimeTextImageEmbedding`)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from holocine_jax.model.layers import dense, with_axes

normal_002 = nnx.initializers.normal(0.02)


def timestep_sinusoid(timesteps, dim: int):
    """[B] timesteps (0..1000) -> [B, dim] float32 embedding in [cos, sin] order (Wan)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nnx.Module):
    """`linear_1 -> SiLU -> linear_2`: [B, freq_dim] -> [B, dim]; float32 (modulation path)."""

    def __init__(self, freq_dim: int, dim: int, *, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs, kernel_init=normal_002)
        self.linear_1 = dense(freq_dim, dim, (None, "embed"), **kw)
        self.linear_2 = dense(dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TextProjection(nnx.Module):
    """`linear_1 -> GELU(tanh) -> linear_2` on UMT5 states: [B, Lt, text_dim] -> [B, Lt, dim]."""

    def __init__(self, text_dim: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=normal_002)
        self.linear_1 = dense(text_dim, dim, ("mlp", "embed"), **kw)
        self.linear_2 = dense(dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=True))


class ConditionEmbedder(nnx.Module):
    """Timesteps and text states -> (temb [B, dim], t_mod [B, 6, dim], context [B, Lt, dim]).

    Names mirror diffusers: `time_embedder`, `time_proj`, `text_embedder`. temb and t_mod are
    float32 (Wan keeps modulation in float32).
    """

    def __init__(self, *, dim: int, freq_dim: int, text_dim: int, dtype, param_dtype, rngs: nnx.Rngs):
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, dim, param_dtype=param_dtype, rngs=rngs)
        self.time_proj = dense(dim, 6 * dim, ("embed", "mlp"), dtype=jnp.float32,
                               param_dtype=param_dtype, rngs=rngs, kernel_init=normal_002)
        self.text_embedder = TextProjection(text_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, timesteps, text_states):
        temb = self.time_embedder(timestep_sinusoid(timesteps, self.freq_dim))
        t_mod = self.time_proj(jax.nn.silu(temb)).reshape(temb.shape[0], 6, -1)
        return temb, t_mod, self.text_embedder(text_states)


def patch_embedding(in_channels: int, dim: int, patch_size, *, dtype, param_dtype, rngs) -> nnx.Conv:
    """Conv3d with kernel = stride = patch: [B, F, H, W, C] -> [B, F/pt, H/ph, W/pw, dim]."""
    return nnx.Conv(in_channels, dim, kernel_size=tuple(patch_size), strides=tuple(patch_size),
                    padding="VALID", dtype=dtype, param_dtype=param_dtype,
                    kernel_init=with_axes(nnx.initializers.xavier_uniform(), None, None, None, None, "embed"),
                    bias_init=with_axes(nnx.initializers.zeros_init(), "embed"), rngs=rngs)
