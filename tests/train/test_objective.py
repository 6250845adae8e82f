"""Flow-matching objective against formulas written out by hand (the table in test_flow.py):
DiffSynth's 1000-step shifted training schedule and Gaussian-shaped weights (DESIGN §10), the
A14B expert split, the truncated logit-normal and uniform alternatives, x_t and the masked loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from holocine_jax.config import load_config
from holocine_jax.shots import ShotLayout
from holocine_jax.train import objective
from test_flow import diffsynth_table


def table_index(sigma, shift=5.0):
    """The index i whose sigma_i is `sigma` (inverting the shift by hand)."""
    s = sigma / (shift - (shift - 1.0) * sigma)
    return np.rint(1000.0 * (1.0 - s)).astype(int)


def sampler(*overrides, name="tiny"):
    return objective.make_timestep_sampler(load_config(name, [f"--config.{o}" for o in overrides]))


@pytest.mark.parametrize("boundaries,expected", [((0.0, 1.0), (0, 1000)), ((0.25, 0.3), (250, 300))])
def test_holocine_samples_follow_the_diffsynth_table(boundaries, expected):
    sigmas, ts, weights = diffsynth_table()
    assert abs(weights.mean() - 1.0) < 1e-12
    sample = sampler(f"train.min_boundary={boundaries[0]}", f"train.max_boundary={boundaries[1]}")
    sig, t, w = jax.jit(sample, static_argnums=1)(jax.random.key(3), 20000)
    i = table_index(np.asarray(sig, np.float64))
    np.testing.assert_allclose(sig, sigmas[i], rtol=1e-6)
    np.testing.assert_allclose(t, ts[i], rtol=1e-6)
    np.testing.assert_allclose(w, weights[i], rtol=1e-5, atol=1e-6)
    assert (i.min(), i.max() + 1) == expected  # uniform over [min*1000, max*1000), ends included
    counts = np.histogram(i, bins=10, range=expected)[0]   # 2000 expected per bin
    assert np.all(np.abs(counts - 2000) < 250), counts


def test_weights_depend_only_on_the_own_timestep_and_are_finite_at_batch_one():
    sigmas, ts, weights = diffsynth_table()
    sample = sampler()
    for batch in (1, 2, 7):
        sig, t, w = sample(jax.random.key(batch), batch)
        assert w.shape == (batch,) and np.all(np.isfinite(w))
        np.testing.assert_allclose(w, weights[table_index(np.asarray(sig, np.float64))], rtol=1e-5, atol=1e-6)
    # the same key with a larger batch: the first sample keeps its weight whatever follows it
    x = np.zeros((1, 1, 2, 2, 1), np.float32)
    l1 = objective.per_sample_loss(jnp.ones_like(x), x, x, jnp.ones((1, 1)))
    l3 = objective.per_sample_loss(jnp.concatenate([jnp.ones_like(x), 5 + 0 * x, jnp.nan + x]),
                                   np.concatenate([x, x, x]), np.concatenate([x, x, x]), jnp.ones((3, 1)))
    assert float(l1[0]) == float(l3[0]) == 1.0


def test_a14b_experts_split_at_index_417():
    sigmas, _, _ = diffsynth_table()
    assert sigmas[416] >= 0.875 > sigmas[417]
    for expert, (lo, hi) in (("high", (0, 417)), ("low", (417, 1000))):
        sample = sampler(f"expert={expert}", name="wan22_t2v_a14b")
        assert sample.index_range == (lo, hi)
        i = table_index(np.asarray(sample(jax.random.key(0), 20000)[0], np.float64))
        assert (i.min(), i.max() + 1) == (lo, hi)
    with pytest.raises(ValueError, match="config.expert='mid'"):
        sampler("expert=mid", name="wan22_t2v_a14b")


@pytest.mark.parametrize("mode", ["uniform", "logit_normal"])
@pytest.mark.parametrize("expert", ["high", "low"])
def test_alternatives_respect_the_expert_boundary(mode, expert):
    sig, t, w = sampler(f"expert={expert}", f"train.timesteps={mode}", name="wan22_t2v_a14b")(
        jax.random.key(1), 5000)
    sig = np.asarray(sig)
    assert np.all(w == 1.0)
    np.testing.assert_allclose(t, 1000 * sig, rtol=1e-6)
    if expert == "high":
        assert sig.min() >= 0.875 - 1e-6 and sig.max() <= 1.0
    else:
        assert sig.max() < 0.875 and sig.min() >= 0.0


def test_logit_normal_and_uniform_distributions():
    mean, std = 0.5, 0.8
    sig = np.asarray(sampler("train.timesteps=logit_normal", "train.shift=1.0",
                             f"train.logit_mean={mean}", f"train.logit_std={std}")(jax.random.key(2), 40000)[0])
    z = np.log(sig) - np.log1p(-sig)   # logit of s; shift 1 keeps sigma = s
    assert abs(z.mean() - mean) < 0.03 and abs(z.std() - std) < 0.03
    sig = np.asarray(sampler("train.timesteps=uniform", "train.shift=3.0")(jax.random.key(4), 40000)[0])
    s = sig / (3.0 - 2.0 * sig)       # undo the shift by hand: s is uniform in (0, 1]
    assert abs(s.mean() - 0.5) < 0.01 and abs(np.mean(s < 0.25) - 0.25) < 0.01


def test_bad_sampler_config_is_named():
    with pytest.raises(ValueError, match="config.train.timesteps='cubic'"):
        sampler("train.timesteps=cubic")
    with pytest.raises(ValueError, match="min_boundary=0.6, max_boundary=0.5"):
        sampler("train.min_boundary=0.6", "train.max_boundary=0.5")


def test_noising_target_and_masked_loss_by_hand(rng):
    x0, noise = rng.standard_normal((2, 3, 2, 2, 4)), rng.standard_normal((2, 3, 2, 2, 4))
    sig = np.array([0.2, 0.9])
    xt = objective.noised(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(sig))
    np.testing.assert_allclose(xt[1], 0.1 * x0[1] + 0.9 * noise[1], rtol=1e-6)
    pred = rng.standard_normal(x0.shape)
    mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    loss = objective.per_sample_loss(jnp.asarray(pred), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(mask))
    for b in range(2):
        err = [np.mean((pred[b, f] - (noise[b, f] - x0[b, f])) ** 2) for f in range(3) if mask[b, f]]
        np.testing.assert_allclose(loss[b], np.mean(err), rtol=1e-5)


def test_frame_mask_from_the_layout():
    layout = ShotLayout.stack([ShotLayout.from_latent_cuts(5, cuts, latent_hw=(2, 2), max_shots=4)
                               for cuts in ([2], [1, 3, 4])])
    assert np.array_equal(objective.frame_mask(layout, 2, 5), np.ones((2, 5)))
    # a layout whose last frames lie past the last real shot (a padded film) masks them out
    padded = layout.__class__(np.array([[0, 2, 3, 5], [0, 5, 5, 5]], np.int32), np.array([2, 1], np.int32),
                              layout.text_windows, layout.text_pad_start, 5, 4, 4, 1)
    assert np.array_equal(objective.frame_mask(padded, 2, 5), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert np.array_equal(objective.frame_mask(None, 2, 3), np.ones((2, 3)))
