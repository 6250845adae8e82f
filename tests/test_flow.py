"""The shared flow-matching maths against formulas written out here: the shift and its inverse,
and DiffSynth's 1000-step training table with its Gaussian-shaped weights (DESIGN §10)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from holocine_jax import flow


def diffsynth_table(shift=5.0):
    """sigma_i = shift(1 - i/1000), t_i = 1000 sigma_i, w_i = (y_i - min y) * 1000 / sum(y - min y),
    y_i = exp(-2 ((t_i - 500) / 1000)^2), written element by element."""
    sigmas, ts = [], []
    for i in range(1000):
        s = 1.0 - i / 1000.0
        sigma = shift * s / (1.0 + (shift - 1.0) * s)
        sigmas.append(sigma)
        ts.append(1000.0 * sigma)
    ys = [math.exp(-2.0 * ((t - 500.0) / 1000.0) ** 2) for t in ts]
    low = min(ys)
    total = sum(y - low for y in ys)
    return np.array(sigmas), np.array(ts), np.array([(y - low) * 1000.0 / total for y in ys])


@pytest.mark.parametrize("shift", [1.0, 5.0, 12.0])
def test_holocine_tables_are_diffsynths(shift):
    assert flow.NUM_TRAIN_TIMESTEPS == 1000
    for ours, want in zip(flow.holocine_tables(shift), diffsynth_table(shift)):
        assert ours.shape == (1000,)
        np.testing.assert_allclose(ours, want, rtol=1e-12, atol=1e-12)
    assert abs(flow.holocine_tables(shift)[2].mean() - 1.0) < 1e-12


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
def test_shift_by_hand_and_its_inverse(shift):
    s = np.linspace(0.0, 1.0, 101)
    sigma = flow.shift_sigma(s, shift)
    np.testing.assert_allclose(sigma, [shift * x / (1.0 + (shift - 1.0) * x) for x in s], rtol=1e-12)
    np.testing.assert_allclose(flow.unshift_sigma(sigma, shift), s, rtol=1e-12, atol=1e-15)
    assert sigma[0] == 0.0 and sigma[-1] == 1.0 and np.all(np.diff(sigma) > 0)
    if shift > 1:                                  # more of the schedule at high noise
        assert np.all(sigma[1:-1] > s[1:-1])
    traced = flow.shift_sigma(jnp.asarray(s, jnp.float32), shift)   # jax arrays work alike
    np.testing.assert_allclose(traced, sigma, rtol=1e-6, atol=1e-7)

