"""3-D rotary position embedding of Wan (DESIGN §4).

head_dim d is split into frame / height / width parts of d - 4*(d//6), 2*(d//6), 2*(d//6)
(44/42/42 for d = 128); each rotates adjacent pairs (x[2i], x[2i+1]) by position * theta^(-2i/n).
Tables are built in float64 with NumPy (as the official code does) and cast to float32.
Frame positions run on across the concatenated shots (HoloCine adds no shot-index embedding).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """(frame, height, width) sizes of the head dim."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions, dim: int, theta: float) -> np.ndarray:
    """[len(positions), dim // 2] float64 angles: position * theta^(-2i/dim)."""
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return np.outer(np.asarray(positions, dtype=np.float64), freqs)


def rope_tables(head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0,
                frame_positions=None):
    """cos, sin: [F*h*w, head_dim // 2] float32 for the token grid (F, h, w) in (f, y, x) order.

    frame_positions: [F] static frame positions (`ShotLayout.rope_frame_positions()`; default
    0..F-1). cos/sin are evaluated per axis in float64 (small tables) and broadcast over the
    grid, so a 95k-token film embeds kilobytes of constants, not an [L, D/2] table.
    """
    f, h, w = grid
    frames = np.arange(f) if frame_positions is None else np.asarray(frame_positions)
    if frames.shape != (f,):
        raise ValueError(f"frame_positions has shape {frames.shape}, expected ({f},)")
    angles = [_axis_angles(p, d, theta)
              for p, d in zip((frames, np.arange(h), np.arange(w)), rope_split(head_dim))]
    shapes = [(f, 1, 1, -1), (1, h, 1, -1), (1, 1, w, -1)]

    def table(fn):
        parts = [jnp.broadcast_to(jnp.asarray(fn(a), jnp.float32).reshape(s), (f, h, w, a.shape[1]))
                 for a, s in zip(angles, shapes)]
        return jnp.concatenate(parts, axis=-1).reshape(f * h * w, head_dim // 2)

    return table(np.cos), table(np.sin)


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs. x: [B, L, H, D]; cos, sin: [L, D // 2]. Returns x's dtype."""
    b, l, h, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, l, h, d // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(b, l, h, d).astype(x.dtype)
