"""The sampling step cache (sample/cache.py): "none" is today's program, the TeaCache rule on a
tiny DiT and on a hand-made indicator sequence; block-stack runs are counted independently."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from holocine_jax.model import WanDiT
from holocine_jax.model.transformer import Embedded
from holocine_jax.sample import sampler
from holocine_jax.sample.cache import TeaCache, cache_from_config
from holocine_jax.sample.sampler import initial_noise, sample_film
from holocine_jax.shots import ShotLayout, latent_shape
from sample.test_sampler import inputs, layout_for, random_model, small_config

STEPS = 6  # shift 5, boundary 0.9: t = 1000, 962, 909 (high-noise expert) | 833, 714, 500 (low)


def cfg_config(**sample):
    """Two experts, CFG on both (guidance 4 / 2.5), six steps."""
    config = small_config(guidance_scale=(4.0, 2.5), num_steps=STEPS, **sample)
    config.experts.boundary = 0.9
    return config


@pytest.fixture(scope="module")
def models():
    return [random_model(0), random_model(1)]


@pytest.fixture(scope="module")
def problem():
    """Text, negative, a batch of two films with different cuts and windows, a key."""
    text, negative = inputs(cfg_config(), 2, np.random.default_rng(0))
    layout = ShotLayout.stack([layout_for([1], [[0, 4], [4, 8], [8, 12]], 12),
                               layout_for([1, 2], [[0, 3], [3, 6], [6, 9], [9, 12]], 12)])
    return text, negative, layout, jax.random.key(3)


@pytest.fixture(scope="module")
def off(models, problem):
    """The film batch sampled without a cache (before any test patches the model)."""
    return run(models, cfg_config(), problem)


@pytest.fixture
def block_runs(monkeypatch):
    """Counts executions of the DiT block stack (a host callback inside it), not the cache's."""
    runs = []
    original = WanDiT.run_blocks

    def counted(self, x, *args, **kwargs):
        jax.debug.callback(lambda: runs.append(1))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(WanDiT, "run_blocks", counted)
    sampler._jitted_step.cache_clear()  # programs traced before the patch would not count
    yield runs
    sampler._jitted_step.cache_clear()


def run(models, config, problem, computed=None):
    text, negative, layout, key = problem
    return np.asarray(sample_film(models, config, text, negative, layout, key, progress=False,
                                  computed=computed))


def pre_cache_loop(models, config, problem):
    """The sampler as it was before the cache, written out: one jitted guided Euler step."""
    text, negative, layout, key = problem
    sched = sampler.scheduler_from_config(config)
    experts = sched.expert_of_step(config.experts.boundary, 2)
    negative = jnp.broadcast_to(negative, text.shape)
    negative_layout = layout.without_text_windows()

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def step(graphdef, scale, params, x, i):
        model = nnx.merge(graphdef, params)
        t = jnp.full((x.shape[0],), jnp.asarray(sched.timesteps)[i])
        both = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     jnp.concatenate([text, negative]),
                     jax.tree.map(lambda a, b: jnp.concatenate([a, b]), layout, negative_layout))
        positive, neg = jnp.split(both.astype(jnp.float32), 2)
        return sched.step((), neg + scale * (positive - neg), i, x)[0]

    x = initial_noise(key, latent_shape(config, text.shape[0]))
    for i in range(STEPS):
        e = int(experts[i])
        graphdef, params = nnx.split(models[e])
        x = step(graphdef, config.sample.guidance_scale[e], params, x, np.int32(i))
    return np.asarray(x)


def test_cache_none_is_the_uncached_sampler_bitwise(models, problem, off):
    assert cfg_config().sample.cache == "none"  # the default
    np.testing.assert_array_equal(off, pre_cache_loop(models, cfg_config(), problem))


def test_threshold_zero_skips_nothing(models, problem, off, block_runs):
    computed = []
    on = run(models, cfg_config(cache="teacache", cache_threshold=0.0), problem, computed)
    assert len(block_runs) == STEPS and computed == [True] * STEPS
    np.testing.assert_allclose(on, off, rtol=1e-6, atol=1e-6)  # (bitwise on XLA:CPU)


def test_huge_threshold_computes_only_the_forced_steps(models, problem, off, block_runs):
    computed = []
    on = run(models, cfg_config(cache="teacache", cache_threshold=1e9), problem, computed)
    # forced: step 0, the low-noise expert's first step (3) and the last step (5)
    assert len(block_runs) == 3
    assert computed == [True, False, False, True, False, True]
    assert np.isfinite(on).all()
    assert np.abs(on - off).max() > 1e-3  # residuals were reused
    forced = TeaCache(1e9, warmup_steps=2).forced_steps([0, 0, 0, 1, 1, 1])
    assert forced.tolist() == [True, True, False, True, False, True]


class StubDiT(nnx.Module):
    """A model with the DiT's split whose indicator t_mod is the timestep itself and whose
    blocks double their input: the rule and the reused residual can be followed by hand."""

    def __init__(self):
        self.scale = nnx.Param(jnp.ones(()))

    def token_grid(self, shape):
        return (1, 1, 1)

    def embed(self, latents, timesteps, text_states, layout=None):
        t_mod = jnp.broadcast_to(timesteps[:, None, None], (timesteps.shape[0], 6, 4))
        return Embedded(latents.reshape(latents.shape[0], 1, 4), None, t_mod, None, None)

    def run_blocks(self, x, context, t_mod, rope, layout=None):
        return 2.0 * self.scale[...] * x

    def head(self, x, temb, grid):
        return x


def test_rule_on_a_hand_made_sequence():
    # t_mod per step (constant over its elements): relative L1 changes 0.05, 0.05, 0.15, 0.05,
    # 0.3 (forced last step: 0.1)
    t = [1.0, 1.05, 1.1025, 1.267875, 1.33126875, 1.730649375, 1.9037143125]
    forced = [True, False, False, False, False, False, True]
    inputs_ = [float(i + 1) for i in range(len(t))]

    def follow(cache):
        model, memory, skips, outs = StubDiT(), cache.init(1, 1, 4), [], []
        for ti, fi, xi in zip(t, forced, inputs_):
            latents = jnp.full((1, 1, 1, 1, 4), xi)
            v, memory = cache.forward(model, memory, jnp.bool_(fi), latents, jnp.array([ti]), None)
            skips.append(bool(memory.skipped))
            outs.append(float(v[0, 0, 0]))
        return skips, outs

    # identity rescale, threshold 0.2: accumulated 0.05, 0.10 skip | 0.25 compute (reset) |
    # 0.05 skip | 0.35 compute | forced
    skips, outs = follow(TeaCache(0.2))
    assert skips == [False, True, True, False, True, False, False]
    # computed: 2x; skipped: x + the last computed step's residual (its x)
    assert outs == pytest.approx([2, 3, 4, 8, 9, 12, 14])
    # the change is measured from the previous step, skipped or not: at 0.12 the same pattern
    # (measured from the last computed step, step 2 would accumulate 0.05 + 0.1025 and compute)
    assert follow(TeaCache(0.12))[0] == skips
    # the polynomial acts: d = 3 change -> 0.15 skip | 0.30 compute | 0.45 compute | 0.15 skip |
    # 1.05 compute
    skips, _ = follow(TeaCache(0.2, coefficients=(3.0, 0.0)))
    assert skips == [False, True, False, False, True, False, False]


def test_config_errors_name_the_choices():
    with pytest.raises(ValueError, match=r"cache='tea_cache'.*'none', 'teacache'"):
        cache_from_config(small_config(cache="tea_cache"))
    with pytest.raises(ValueError, match="cache_warmup_steps"):
        cache_from_config(small_config(cache="teacache", cache_warmup_steps=0))
    with pytest.raises(ValueError, match="cache_threshold"):
        cache_from_config(small_config(cache="teacache", cache_threshold=-1.0))
    assert cache_from_config(small_config()) is None
    assert cache_from_config(small_config(cache="teacache")) == TeaCache(0.2, (1.0, 0.0), 1)
