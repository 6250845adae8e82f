"""The sampling loop: guidance, expert switch, batched layouts and determinism on a tiny DiT."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from holocine_jax.model import WanDiT
from holocine_jax.sample.sampler import initial_noise, sample_film
from holocine_jax.sample.schedulers import make_scheduler
from holocine_jax.shots import ShotLayout, latent_shape
from conftest import tiny_config

STEPS = 3


def small_config(**sample):
    c = tiny_config(num_layers=1)
    c.video.num_frames, c.video.height, c.video.width = 9, 32, 32  # latents [B, 3, 4, 4, 16]
    with c.ignore_type():  # guidance_scale may become a per-expert tuple
        c.sample.update(**{"num_steps": STEPS, **sample})
    return c


@functools.lru_cache(maxsize=4)
def random_model(seed):
    """A tiny DiT of `small_config()` with a non-zero output head (WanDiT zero-initialises
    proj_out). Cached: construction dominates these tests' time; tests never mutate it."""
    model = WanDiT.from_config(small_config(), rngs=nnx.Rngs(seed))
    kernel = model.proj_out.kernel
    kernel[...] = 0.05 * jax.random.normal(jax.random.key(seed + 100), kernel.shape)
    return model


@pytest.fixture(scope="module")
def models():
    """Two tiny experts (high noise, low noise)."""
    return [random_model(0), random_model(1)]


def inputs(config, batch, rng):
    lt, d = config.model.text_len, config.model.text_dim
    text = jnp.asarray(rng.standard_normal((batch, lt, d)), jnp.float32)
    negative = jnp.asarray(rng.standard_normal((1, lt, d)), jnp.float32)
    return text, negative


def layout_for(cuts, windows=None, pad=None):
    return ShotLayout.from_latent_cuts(3, cuts, latent_hw=(2, 2), max_shots=3,
                                       text_windows=windows, text_pad_start=pad)


_forward = nnx.jit(lambda model, *args: model(*args))


def reference_euler(models, config, text, negative, layout, key, scales, switch_at):
    """The guided Euler loop written out: v = v_neg + g (v_pos - v_neg); x += v dsigma."""
    sched = make_scheduler("euler", num_steps=STEPS, shift=config.sample.shift)
    x = initial_noise(key, latent_shape(config, text.shape[0]))
    b = text.shape[0]
    layout = None if layout is None else layout.broadcast_to_batch(b)
    negative_layout = None if layout is None else layout.without_text_windows()
    for i in range(STEPS):
        e = 0 if i < switch_at else 1
        t = jnp.full((b,), sched.timesteps[i])
        pos = _forward(models[e], x, t, text, layout)
        neg = _forward(models[e], x, t, jnp.broadcast_to(negative, text.shape), negative_layout)
        v = neg + scales[e] * (pos - neg)
        x = x + v * (sched.sigmas[i + 1] - sched.sigmas[i])
    return x


def test_guided_expert_switch_matches_written_out_loop(rng, models):
    config = small_config(guidance_scale=(4.0, 2.5), shift=5.0)
    config.experts.boundary = 0.9  # shift 5, 3 steps: t = 1000, 937.5, 833.3 -> 2 high + 1 low
    text, negative = inputs(config, 2, rng)
    layout = ShotLayout.stack([layout_for([1], [[0, 4], [4, 8], [8, 12]], 12),
                               layout_for([1, 2], [[0, 3], [3, 6], [6, 9], [9, 12]], 12)])
    key = jax.random.key(3)
    got = sample_film(models, config, text, negative, layout, key, progress=False)
    want = reference_euler(models, config, text, negative, layout, key, (4.0, 2.5), switch_at=2)
    assert got.shape == (2, 3, 4, 4, 16)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The switch matters: all steps on the high-noise expert give a different film.
    high_only = reference_euler(models, config, text, negative, layout, key, (4.0, 2.5), 99)
    assert np.abs(np.asarray(got) - np.asarray(high_only)).max() > 1e-3


def test_deterministic_and_batch_equals_single_films(rng, models):
    config = small_config(scheduler="unipc", guidance_scale=3.0)
    model = models[0]
    text, negative = inputs(config, 2, rng)
    layouts = [layout_for([1]), layout_for([2])]
    keys = jax.random.split(jax.random.key(0), 2)
    batch = sample_film(model, config, text, negative, ShotLayout.stack(layouts), keys,
                        progress=False)
    again = sample_film(model, config, text, negative, ShotLayout.stack(layouts), keys,
                        progress=False)
    np.testing.assert_array_equal(batch, again)
    for b in range(2):
        single = sample_film(model, config, text[b:b + 1], negative, layouts[b], keys[b:b + 1],
                             progress=False)
        np.testing.assert_allclose(batch[b:b + 1], single, rtol=1e-5, atol=1e-5)
    other = sample_film(model, config, text, negative, ShotLayout.stack(layouts),
                        jax.random.split(jax.random.key(1), 2), progress=False)
    assert np.abs(np.asarray(other) - np.asarray(batch)).max() > 1e-2


def test_guidance_one_skips_the_negative_pass(rng, models):
    config = small_config(guidance_scale=1.0)
    model = models[0]
    text, negative = inputs(config, 1, rng)
    poisoned = jnp.full_like(negative, jnp.nan)  # would make any unconditional pass NaN
    out = sample_film(model, config, text, poisoned, layout_for([1]), jax.random.key(0),
                      progress=False)
    assert np.isfinite(np.asarray(out)).all()
    config.sample.guidance_scale = 2.0
    out = sample_film(model, config, text, poisoned, layout_for([1]), jax.random.key(0),
                      progress=False)
    assert np.isnan(np.asarray(out)).all()
    # Without a layout the model runs as plain Wan (one shot, no text windows).
    plain = sample_film(model, config, text, negative, None, jax.random.key(0), progress=False)
    want = reference_euler([model], config, text, negative, None, jax.random.key(0), (2.0,), 99)
    np.testing.assert_allclose(plain, want, rtol=1e-4, atol=1e-4)


def test_bad_guidance_and_negative_shapes(rng, models):
    config = small_config(guidance_scale=(4.0, 3.0))
    model = models[0]
    text, negative = inputs(config, 1, rng)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_film(model, config, text, negative, layout_for([1]), jax.random.key(0))
    with config.ignore_type():
        config.sample.guidance_scale = 2.0
    with pytest.raises(ValueError, match="negative_states"):
        sample_film(model, config, text, negative[:, :5], layout_for([1]), jax.random.key(0))
