"""Flow-matching maths shared by training and sampling (DESIGN §10, §11).

    x_t = (1 - σ) x0 + σ ε,   v = ε - x0,   t = 1000 σ,   σ = shift(s) = k s / (1 + (k-1) s)

The training schedule is DiffSynth's FlowMatchScheduler as HoloCine trains with it: a
1000-entry table σ_i = shift(1 - i/1000), t_i = 1000 σ_i, and Gaussian-shaped weights w_i
(mean 1). Works on numpy and jax arrays alike.
"""
from __future__ import annotations

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(s, shift: float):
    """σ = shift·s / (1 + (shift − 1)·s): more steps at high noise for shift > 1."""
    return shift * s / (1 + (shift - 1) * s)


def unshift_sigma(sigma, shift: float):
    """Inverse of `shift_sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def holocine_tables(shift: float, n: int = NUM_TRAIN_TIMESTEPS):
    """DiffSynth's training schedule: (sigmas [n], timesteps [n] = n·σ, weights [n], mean 1)."""
    sigmas = shift_sigma(1.0 - np.arange(n, dtype=np.float64) / n, shift)
    timesteps = sigmas * n
    y = np.exp(-2.0 * ((timesteps - n / 2) / n) ** 2)
    y = y - y.min()
    return sigmas, timesteps, y * n / y.sum()
