"""Wan VAE layers in Flax NNX, channels-last, named like diffusers' `AutoencoderKLWan` (DESIGN §8).

Chunked causal execution: every module that looks back in time is called as
`module(x, cache) -> (y, new_cache)`. `cache=None` means "first chunk" (zeros before the film,
and the temporal resampling convs are skipped, as in Wan); afterwards `cache` holds what the
module needs from the previous chunk (the last two input frames of a temporal 3-conv, the last
frame of a temporal down-conv) and always has the same shapes, so chunks can run in a `lax.scan`.
Stateless modules return `None` as their cache.

Parameter layout vs PyTorch: Conv3d `kernel` [kt, kh, kw, in, out] (torch [out, in, kt, kh, kw]),
Conv2d `kernel` [kh, kw, in, out], RMS-norm `gamma` [1, 1, (1,) C] (torch [C, 1, 1, (1)]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

CACHE_T = 2  # frames a temporal 3-conv needs from the previous chunk


def _triple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def _conv_params(rngs: nnx.Rngs, shape: tuple, fan_in: int):
    bound = fan_in ** -0.5
    kernel = nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))
    bias = nnx.Param(jnp.zeros((shape[-1],), jnp.float32))
    return kernel, bias


class CausalConv3d(nnx.Module):
    """Conv3d padded causally in time (2·p_t zeros, or the cache, before) and symmetrically in space.

    x: [B, T, H, W, C_in] -> [B, T', H', W', C_out].
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, *, stride=1, padding=0, rngs: nnx.Rngs):
        kt, kh, kw = _triple(kernel_size)
        self.kernel, self.bias = _conv_params(rngs, (kt, kh, kw, in_dim, out_dim), in_dim * kt * kh * kw)
        self.stride = _triple(stride)
        pt, ph, pw = _triple(padding)
        self.cache_frames = 2 * pt
        self.spatial_padding = ((ph, ph), (pw, pw))

    def conv(self, x: jax.Array) -> jax.Array:
        """The convolution on an already time-padded input (valid in time)."""
        y = jax.lax.conv_general_dilated(
            x, self.kernel.astype(x.dtype), self.stride, ((0, 0),) + self.spatial_padding,
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + self.bias.astype(x.dtype)

    def __call__(self, x: jax.Array, cache: jax.Array | None = None):
        """(y, new cache [B, 2·p_t, H, W, C_in]); cache None: zeros before the first frame."""
        if self.cache_frames == 0:
            return self.conv(x), None
        if cache is None:
            cache = jnp.zeros((x.shape[0], self.cache_frames) + x.shape[2:], x.dtype)
        x = jnp.concatenate([cache, x], axis=1)
        return self.conv(x), x[:, -self.cache_frames:]


class Conv2d(nnx.Module):
    """Frame-wise 2-D convolution. x: [..., H, W, C_in] -> [..., H', W', C_out]."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, rngs: nnx.Rngs):
        k = kernel_size
        self.kernel, self.bias = _conv_params(rngs, (k, k, in_dim, out_dim), in_dim * k * k)
        self.stride = (stride, stride)
        self.padding = ((padding, padding), (padding, padding))

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, frame = x.shape[:-3], x.shape[-3:]
        y = jax.lax.conv_general_dilated(
            x.reshape((-1,) + frame), self.kernel.astype(x.dtype), self.stride, self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (y + self.bias.astype(x.dtype)).reshape(lead + y.shape[1:])


class RMSNorm(nnx.Module):
    """Wan's VAE norm over channels: `x / max(||x||, 1e-12) · sqrt(C) · γ` (no mean, no eps²)."""

    def __init__(self, dim: int, *, images: bool = False):
        self.gamma = nnx.Param(jnp.ones((1,) * (2 if images else 3) + (dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * (x.shape[-1] ** 0.5) * self.gamma
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """`norm1 -> silu -> conv1 -> norm2 -> silu -> conv2` plus (1x1x1 `conv_shortcut`) input.

    x: [B, T, H, W, in_dim] -> [B, T, H, W, out_dim]; cache: (conv1 cache, conv2 cache).
    """

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, rngs=rngs)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, rngs=rngs)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, rngs=rngs) if in_dim != out_dim else None

    def __call__(self, x, cache=None):
        c1, c2 = cache if cache is not None else (None, None)
        h = self.conv_shortcut.conv(x) if self.conv_shortcut is not None else x
        x, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        x, c2 = self.conv2(jax.nn.silu(self.norm2(x)), c2)
        return x + h, (c1, c2)


class AttentionBlock(nnx.Module):
    """Single-head spatial self-attention within each frame. x: [B, T, H, W, C] -> same."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = Conv2d(dim, 3 * dim, 1, rngs=rngs)
        self.proj = Conv2d(dim, dim, 1, rngs=rngs)

    def __call__(self, x, cache=None):
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        scores = jnp.einsum("nqc,nkc->nqk", q, k) / c**0.5
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("nqk,nkc->nqc", probs, v).reshape(b, t, h, w, c)
        return x + self.proj(y), None


class Upsample2x(nnx.Module):
    """Nearest 2x spatial upsampling (diffusers' `WanUpsample`, `nearest-exact`). [..., H, W, C]."""

    def __call__(self, x):
        return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


class PadRightBottom(nnx.Module):
    """One zero row below and one zero column right (diffusers' `ZeroPad2d((0, 1, 0, 1))`)."""

    def __call__(self, x):
        pad = [(0, 0)] * (x.ndim - 3) + [(0, 1), (0, 1), (0, 0)]
        return jnp.pad(x, pad)


class Resample(nnx.Module):
    """Spatial 2x up/down (`resample.1` is the conv) with an optional causal temporal 2x (`time_conv`).

    modes: upsample2d | upsample3d | downsample2d | downsample3d. On the first chunk
    (cache None) the temporal conv is skipped, so one frame stays one frame.
    """

    def __init__(self, dim: int, mode: str, *, out_dim: int | None = None, rngs: nnx.Rngs):
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nnx.List([Upsample2x(), Conv2d(dim, out_dim or dim // 2, 3, padding=1, rngs=rngs)])
        elif mode.startswith("downsample"):
            self.resample = nnx.List([PadRightBottom(), Conv2d(dim, dim, 3, stride=2, rngs=rngs)])
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), rngs=rngs)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), rngs=rngs)
        else:
            self.time_conv = None

    def __call__(self, x, cache=None):
        """x: [B, T, H, W, C] -> [B, T·2 | T/2 | T, 2H | H/2, ...]; returns (y, cache)."""
        if self.mode == "upsample3d":
            if cache is None:
                cache = jnp.zeros((x.shape[0], CACHE_T) + x.shape[2:], x.dtype)
            else:
                y, cache = self.time_conv(x, cache)
                b, t, h, w, _ = y.shape
                # Channels [2C] are (phase, C): phase p of frame i becomes frame 2i + p.
                x = y.reshape(b, t, h, w, 2, -1).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, -1)
        x = self.resample[1](self.resample[0](x))
        if self.mode == "downsample3d":
            last = x[:, -1:]
            if cache is not None:
                x = self.time_conv.conv(jnp.concatenate([cache, x], axis=1))
            cache = last
        return x, (cache if self.time_conv is not None else None)


def avg_down(x: jax.Array, out_dim: int, factor_t: int, factor_s: int) -> jax.Array:
    """Wan 2.2's `AvgDown3D` shortcut: space/time-to-channel then mean over channel groups.

    x: [B, T, H, W, C] (front-padded with zero frames to a multiple of factor_t)
    -> [B, T/ft, H/fs, W/fs, out_dim].
    """
    b, t, h, w, c = x.shape
    pad_t = (-t) % factor_t
    x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
    t = (t + pad_t) // factor_t
    x = x.reshape(b, t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # [b, t, h, w, c, ft, fs_h, fs_w]
    return x.reshape(b, t, h // factor_s, w // factor_s, out_dim, -1).mean(axis=-1)


def dup_up(x: jax.Array, out_dim: int, factor_t: int, factor_s: int, first_chunk: bool) -> jax.Array:
    """Wan 2.2's `DupUp3D` shortcut: repeat channels, then channel-to-space/time.

    x: [B, T, H, W, C] -> [B, T·ft (minus ft-1 on the first chunk), H·fs, W·fs, out_dim].
    """
    b, t, h, w, c = x.shape
    x = jnp.repeat(x, out_dim * factor_t * factor_s * factor_s // c, axis=-1)
    x = x.reshape(b, t, h, w, out_dim, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * factor_t, h * factor_s, w * factor_s, out_dim)
    return x[:, factor_t - 1:] if first_chunk else x


def patchify(x: jax.Array, p: int) -> jax.Array:
    """[B, T, H, W, C] -> [B, T, H/p, W/p, C·p·p]; channel order (c, w-offset, h-offset) as Wan 2.2."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x: jax.Array, p: int) -> jax.Array:
    """Inverse of `patchify`: [B, T, h, w, C·p·p] -> [B, T, h·p, w·p, C]."""
    if p == 1:
        return x
    b, t, h, w, cp = x.shape
    x = x.reshape(b, t, h, w, cp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, cp // (p * p))
