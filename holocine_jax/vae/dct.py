"""The tiny config's analytic autoencoder: blockwise DCT truncation with Wan's latent geometry.

A latent cell covers 8x8 pixels and, like Wan, the first frame alone, then 4 frames at a time
(T = 4n+1 pixel frames -> n+1 latent frames). Its `z` channels are coefficients of fixed
orthonormal basis functions: colour (luma, two chroma axes) x temporal DCT-II x spatial 8x8
DCT-II, keeping the lowest frequencies (luma gets the most, chroma the spatial DC and first
harmonics, one channel the temporal first harmonic of luma). Encoding is the projection onto
them, decoding the adjoint, so `decode(encode(x))` is the best approximation of x in that
subspace and nothing is trained or downloaded (DESIGN §9).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from holocine_jax.vae.wan import check_video

# Orthonormal colour axes: luma, red-green, yellow-blue.
COLOUR = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], np.float64) / np.sqrt([[3], [2], [6]])


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis [k, x] of length n."""
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def coefficient_list(z_dim: int) -> list[tuple]:
    """The kept (colour, temporal k, spatial u, spatial v) frequencies, most important first."""
    luma = sorted(((u, v) for u in range(8) for v in range(8)), key=lambda uv: (uv[0] + uv[1], uv))
    chroma = [(c, 0, u, v) for u, v in ((0, 0), (0, 1), (1, 0)) for c in (1, 2)]
    fixed = [(0, 0, 0, 0), (0, 1, 0, 0)] + chroma
    rest = [(0, 0, u, v) for u, v in luma[1:]]
    if z_dim < len(fixed) + 1:
        raise ValueError(f"the DCT autoencoder needs z_dim >= {len(fixed) + 1}, got {z_dim}")
    return fixed + rest[: z_dim - len(fixed)]


def basis(z_dim: int, frames: int, spatial: int = 8) -> np.ndarray:
    """Basis [frames, s, s, 3, z] of one latent cell (frames: 1 for the first, 4 after)."""
    t_dct, s_dct = dct_matrix(frames), dct_matrix(spatial)
    out = np.zeros((frames, spatial, spatial, 3, z_dim))
    for j, (c, k, u, v) in enumerate(coefficient_list(z_dim)):
        if k < frames:
            out[..., j] = np.einsum("t,h,w,c->thwc", t_dct[k], s_dct[u], s_dct[v], COLOUR[c])
    return out.astype(np.float32)


class DCTAutoencoder:
    """`encode(video [B, T, H, W, 3]) -> [B, F, H/8, W/8, z]`, `decode` back (clipped to [-1, 1])."""

    def __init__(self, z_dim: int = 16, stride: tuple = (4, 8, 8)):
        st, sh, sw = stride
        if sh != sw:
            raise ValueError(f"the DCT autoencoder needs a square spatial stride, got {stride}")
        self.z_dim, self.stride = z_dim, tuple(stride)
        self.first, self.rest = jnp.asarray(basis(z_dim, 1, sh)), jnp.asarray(basis(z_dim, st, sh))

    def _cells(self, x, frames):
        """[B, T, H, W, C] -> [B, T/frames, frames, H/s, s, W/s, s, C]."""
        b, t, h, w, c = x.shape
        s = self.stride[1]
        return x.reshape(b, t // frames, frames, h // s, s, w // s, s, c)

    def encode(self, video: jax.Array) -> jax.Array:
        check_video(video.shape, self.stride)
        first = jnp.einsum("bftxpyqc,tpqcz->bfxyz", self._cells(video[:, :1], 1), self.first)
        rest = jnp.einsum("bftxpyqc,tpqcz->bfxyz", self._cells(video[:, 1:], self.stride[0]), self.rest)
        return jnp.concatenate([first, rest], axis=1)

    def decode(self, latents: jax.Array) -> jax.Array:
        if latents.ndim != 5 or latents.shape[-1] != self.z_dim:
            raise ValueError(f"latents must be [B, F, h, w, {self.z_dim}], got {latents.shape}")
        b, f, h, w, _ = latents.shape
        s, st = self.stride[1], self.stride[0]
        first = jnp.einsum("bfxyz,tpqcz->bftxpyqc", latents[:, :1], self.first).reshape(b, 1, h * s, w * s, 3)
        rest = jnp.einsum("bfxyz,tpqcz->bftxpyqc", latents[:, 1:], self.rest)
        rest = rest.reshape(b, (f - 1) * st, h * s, w * s, 3)
        return jnp.clip(jnp.concatenate([first, rest], axis=1), -1.0, 1.0)
