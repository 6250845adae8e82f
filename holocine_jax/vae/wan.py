"""Wan VAE 2.1 / 2.2 (`AutoencoderKLWan`) in Flax NNX with chunked causal encode and decode.

    vae = AutoencoderKLWan(WanVAEArch.from_version("2.1"), rngs=nnx.Rngs(0))
    latents = vae.encode(video)    # video [B, T, H, W, 3] in [-1, 1], T = 4n+1 -> [B, n+1, h, w, z]
    video = vae.decode(latents)    # -> [B, 4(F-1)+1, H, W, 3] clipped to [-1, 1]

Encode runs the first frame alone, then 4 frames per chunk; decode runs one latent frame per chunk
(DESIGN §8). Chunks after the first are one `lax.scan` step with the feature caches as carry and
the result written in place, so the compiled program holds one chunk of activations whatever the
film length. 2.1 vs 2.2 is one module with options (`is_residual`, `patch_size`), as diffusers.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from holocine_jax.vae.layers import (AttentionBlock, CausalConv3d, RMSNorm, Resample, ResidualBlock,
                                     avg_down, dup_up, patchify, unpatchify)


@dataclasses.dataclass(frozen=True)
class WanVAEArch:
    """Architecture, field names as diffusers' `AutoencoderKLWan` config."""
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None

    @classmethod
    def from_dict(cls, d, source: str = "config") -> "WanVAEArch":
        """From a diffusers `config.json` dict (or `config.vae`); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(d).items() if k in names}
        arch = cls(**kw)
        if len(arch.temperal_downsample) != len(arch.dim_mult) - 1:
            raise ValueError(f"{source}: temperal_downsample {arch.temperal_downsample} needs "
                             f"len(dim_mult) - 1 = {len(arch.dim_mult) - 1} entries")
        if arch.attn_scales:
            raise ValueError(f"{source}: attn_scales={list(arch.attn_scales)} is not supported "
                             "(Wan VAEs have attention only in the mid blocks)")
        return arch

    @property
    def stride(self) -> tuple:
        """(t, h, w) pixels per latent cell."""
        s = 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)
        return (2 ** sum(self.temperal_downsample), s, s)


class MidBlock(nnx.Module):
    """resnets[0] -> attentions[0] -> resnets[1]. x: [B, T, H, W, dim] -> same."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, rngs=rngs)])

    def __call__(self, x, cache=None):
        c0, c1 = cache if cache is not None else (None, None)
        x, c0 = self.resnets[0](x, c0)
        x, _ = self.attentions[0](x)
        x, c1 = self.resnets[1](x, c1)
        return x, (c0, c1)


def _run(layers, x, cache):
    """Apply cache-carrying layers in order; cache: a list parallel to `layers` or None."""
    new = []
    for i, layer in enumerate(layers):
        x, c = layer(x, None if cache is None else cache[i])
        new.append(c)
    return x, new


class ResidualDownBlock(nnx.Module):
    """Wan 2.2 encoder stage: resnets (+ `downsampler`) plus the `avg_down` shortcut."""

    def __init__(self, in_dim, out_dim, num_res_blocks, *, temporal: bool, down: bool, rngs):
        self.factors = (2 if temporal else 1, 2 if down else 1)
        self.out_dim = out_dim
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nnx.List([ResidualBlock(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.downsampler = (Resample(out_dim, "downsample3d" if temporal else "downsample2d", rngs=rngs)
                            if down else None)

    def __call__(self, x, cache=None):
        shortcut = avg_down(x, self.out_dim, *self.factors)
        layers = list(self.resnets) + ([self.downsampler] if self.downsampler is not None else [])
        x, cache = _run(layers, x, cache)
        return x + shortcut, cache


class UpBlock(nnx.Module):
    """Decoder stage: resnets, then `upsamplers[0]` (2.1) or `upsampler` + `dup_up` shortcut (2.2)."""

    def __init__(self, in_dim, out_dim, num_res_blocks, *, mode: str | None, residual: bool, rngs):
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.residual = residual
        self.out_dim = out_dim
        self.factors = (2 if mode == "upsample3d" else 1, 2)
        sampler = Resample(out_dim, mode, out_dim=out_dim if residual else None, rngs=rngs) if mode else None
        if residual:
            self.upsampler = sampler
        else:
            self.upsamplers = nnx.List([sampler]) if sampler is not None else None

    def __call__(self, x, cache=None):
        sampler = self.upsampler if self.residual else (self.upsamplers or [None])[0]
        layers = list(self.resnets) + ([sampler] if sampler is not None else [])
        y, new = _run(layers, x, cache)
        if self.residual and sampler is not None:
            y = y + dup_up(x, self.out_dim, *self.factors, first_chunk=cache is None)
        return y, new


class Encoder3d(nnx.Module):
    """Pixels [B, T, H, W, in] -> [B, T', H/8, W/8, 2z] (mean, logvar) for one chunk."""

    def __init__(self, a: WanVAEArch, *, rngs: nnx.Rngs):
        dims = [a.base_dim * m for m in (1,) + tuple(a.dim_mult)]
        self.conv_in = CausalConv3d(a.in_channels, dims[0], 3, padding=1, rngs=rngs)
        blocks, last = [], len(a.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = a.temperal_downsample[i] if i < last else False
            if a.is_residual:
                blocks.append(ResidualDownBlock(in_dim, out_dim, a.num_res_blocks, temporal=temporal,
                                                down=i < last, rngs=rngs))
                continue
            for _ in range(a.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, rngs=rngs))
                in_dim = out_dim
            if i < last:
                blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d", rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], rngs=rngs)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * a.z_dim, 3, padding=1, rngs=rngs)

    def __call__(self, x, cache=None):
        c = cache or {}
        x, c_in = self.conv_in(x, c.get("conv_in"))
        x, c_down = _run(self.down_blocks, x, c.get("down_blocks"))
        x, c_mid = self.mid_block(x, c.get("mid_block"))
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c.get("conv_out"))
        return x, dict(conv_in=c_in, down_blocks=c_down, mid_block=c_mid, conv_out=c_out)


class Decoder3d(nnx.Module):
    """Latents [B, 1, h, w, z] (one latent frame) -> pixels [B, 1 | 4, H, W, out] for one chunk."""

    def __init__(self, a: WanVAEArch, *, rngs: nnx.Rngs):
        base = a.decoder_base_dim or a.base_dim
        mults = tuple(a.dim_mult)
        dims = [base * m for m in (mults[-1],) + mults[::-1]]
        temporal_up = tuple(a.temperal_downsample)[::-1]
        self.conv_in = CausalConv3d(a.z_dim, dims[0], 3, padding=1, rngs=rngs)
        self.mid_block = MidBlock(dims[0], rngs=rngs)
        blocks, last = [], len(mults) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0 and not a.is_residual:
                in_dim //= 2  # the 2.1 upsamplers halve the channels
            mode = None if i == last else ("upsample3d" if temporal_up[i] else "upsample2d")
            blocks.append(UpBlock(in_dim, out_dim, a.num_res_blocks, mode=mode,
                                  residual=a.is_residual, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], a.out_channels, 3, padding=1, rngs=rngs)

    def __call__(self, x, cache=None):
        c = cache or {}
        x, c_in = self.conv_in(x, c.get("conv_in"))
        x, c_mid = self.mid_block(x, c.get("mid_block"))
        x, c_up = _run(self.up_blocks, x, c.get("up_blocks"))
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c.get("conv_out"))
        return x, dict(conv_in=c_in, mid_block=c_mid, up_blocks=c_up, conv_out=c_out)


class AutoencoderKLWan(nnx.Module):
    """Wan VAE: `encoder`, `quant_conv`, `post_quant_conv`, `decoder` (diffusers names)."""

    def __init__(self, arch: WanVAEArch, *, rngs: nnx.Rngs = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.arch = arch
        self.encoder = Encoder3d(arch, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * arch.z_dim, 2 * arch.z_dim, 1, rngs=rngs)
        self.post_quant_conv = CausalConv3d(arch.z_dim, arch.z_dim, 1, rngs=rngs)
        self.decoder = Decoder3d(arch, rngs=rngs)

    @property
    def stride(self) -> tuple:
        return self.arch.stride

    @property
    def z_dim(self) -> int:
        return self.arch.z_dim

    def encode_chunk(self, frames, cache=None):
        """frames [B, 1 | 4, H, W, 3] -> (mean latents [B, 1, h, w, z], cache)."""
        x, cache = self.encoder(patchify(frames, self.arch.patch_size or 1), cache)
        return self.quant_conv.conv(x)[..., :self.arch.z_dim], cache

    def decode_chunk(self, latents, cache=None):
        """latents [B, 1, h, w, z] -> (video [B, 1 | 4, H, W, 3] in [-1, 1], cache)."""
        x, cache = self.decoder(self.post_quant_conv.conv(latents), cache)
        return jnp.clip(unpatchify(x, self.arch.patch_size or 1), -1.0, 1.0), cache

    def encode(self, video: jax.Array) -> jax.Array:
        """video [B, T, H, W, 3] in [-1, 1], T = 4n+1 -> mean latents [B, n+1, h, w, z]."""
        check_video(video.shape, self.stride)
        return encode_jit(*nnx.split(self), video)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents [B, F, h, w, z] (unnormalised) -> video [B, 4(F-1)+1, H, W, 3] in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[-1] != self.arch.z_dim:
            raise ValueError(f"latents must be [B, F, h, w, {self.arch.z_dim}], got {latents.shape}")
        return decode_jit(*nnx.split(self), latents)


def check_video(shape: tuple, stride: tuple) -> None:
    """Raise a ValueError unless `shape` is [B, 4n+1, H, W, 3] with H, W multiples of the stride."""
    st, sh, sw = stride
    if len(shape) != 5 or shape[-1] != 3:
        raise ValueError(f"video must be [B, T, H, W, 3], got shape {tuple(shape)}")
    if (shape[1] - 1) % st:
        raise ValueError(f"video has {shape[1]} frames; the VAE needs {st}n+1 (1, 5, 9, ...)")
    if shape[2] % sh or shape[3] % sw:
        raise ValueError(f"video size {shape[2]}x{shape[3]} is not a multiple of the VAE stride {sh}x{sw}")


def run_chunked(step, inputs: jax.Array, first_size: int, size: int, out_first: jax.Array, cache):
    """Run `step(chunk, cache) -> (out, cache)` over `inputs[:, first_size + size·i : ...]`, i >= 0.

    `out_first` is the first chunk's output (already computed with cache None) and `cache` its
    cache. Later outputs are written in place into one buffer carried by a `lax.scan`, so the
    compiled loop holds one chunk of activations. Returns the concatenated outputs along axis 1.
    """
    n = (inputs.shape[1] - first_size) // size
    if n == 0:
        return out_first
    probe = jax.eval_shape(lambda c, x: step(x, c)[0], cache,
                           jax.ShapeDtypeStruct(inputs.shape[:1] + (size,) + inputs.shape[2:], inputs.dtype))
    per = probe.shape[1]
    out = jnp.zeros(probe.shape[:1] + (out_first.shape[1] + n * per,) + probe.shape[2:], probe.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, out_first.astype(out.dtype), 0, axis=1)

    def body(carry, i):
        cache, out = carry
        chunk = jax.lax.dynamic_slice_in_dim(inputs, first_size + size * i, size, axis=1)
        y, cache = step(chunk, cache)
        return (cache, jax.lax.dynamic_update_slice_in_dim(out, y, out_first.shape[1] + per * i, 1)), None

    (_, out), _ = jax.lax.scan(body, (cache, out), jnp.arange(n))
    return out


@functools.partial(jax.jit, static_argnums=0)
def encode_jit(graphdef, state, video):
    """Jitted `AutoencoderKLWan.encode` on `nnx.split(vae)`; lower() it to inspect memory."""
    vae = nnx.merge(graphdef, state)
    first, cache = vae.encode_chunk(video[:, :1])
    return run_chunked(vae.encode_chunk, video, 1, vae.stride[0], first, cache)


@functools.partial(jax.jit, static_argnums=0)
def decode_jit(graphdef, state, latents):
    """Jitted `AutoencoderKLWan.decode` on `nnx.split(vae)`; lower() it to inspect memory."""
    vae = nnx.merge(graphdef, state)
    first, cache = vae.decode_chunk(latents[:, :1])
    return run_chunked(vae.decode_chunk, latents, 1, 1, first, cache)
