"""WanDiT with a ShotLayout (issue 4, part 4): one shot == plain Wan; `independent` == each
shot run on its own with its own caption window; executors agree; layouts never recompile."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from holocine_jax.model import WanDiT
from holocine_jax.shots import ShotLayout

F, H, W = 6, 4, 6                      # latent grid; patch (1, 2, 2) -> 2 x 3 tokens per frame
HW = (H // 2, W // 2)
TEXT_LEN = 12
rng = np.random.default_rng(0)
LATENTS = rng.standard_normal((2, F, H, W, 16)).astype(np.float32)
TIMESTEPS = np.array([120.0, 830.0], np.float32)
TEXT = rng.standard_normal((2, TEXT_LEN, 32)).astype(np.float32)
# Row 0 global window, then one row per shot; tokens from 11 on are padding (seen by all).
WINDOWS = np.array([[0, 3], [3, 6], [6, 9], [9, 11]], np.int32)
PAD_START = 11


def model_with(params=None, **attention):
    """A tiny 2-layer model with `config.attention` fields set, holding `params` if given."""
    config = tiny_config(num_layers=2)
    config.attention.update(attention)
    model = WanDiT.from_config(config, rngs=nnx.Rngs(3))
    if params is None:  # give the zero-initialised output head weights so outputs are non-trivial
        state = nnx.state(model, nnx.Param)
        keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(state))))
        params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), state)
    nnx.update(model, params)
    return model, params


def layout(cuts, num_frames=F, windows=None, pad_start=None):
    return ShotLayout.from_latent_cuts(num_frames, cuts, latent_hw=HW, max_shots=4,
                                       text_windows=windows, text_pad_start=pad_start)


def run(model, latents=LATENTS, timesteps=TIMESTEPS, text=TEXT, lay=None):
    return np.asarray(model(jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(text), lay))


def assert_close(actual, expected, tol=1e-5):
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= tol, f"relative error {err:.2e} > {tol}"


def test_single_shot_sparse_equals_full_equals_plain_wan():
    plain, params = model_with()
    expected = run(plain)
    one_shot = ShotLayout.stack([layout([])] * 2)
    for mode, impl in [("full", "auto"), ("full", "xla"), ("sparse", "xla"), ("sparse", "reference"),
                       ("independent", "xla")]:
        model, _ = model_with(params, mode=mode, impl=impl, summary_self_weight=1.0, block_q=8,
                              block_kv=8)
        assert_close(run(model, lay=one_shot), expected)
    # The released checkpoints' rule (own first frame listed twice among the keys) is a real
    # change even for one shot: summary_self_weight=2 must not equal plain attention.
    doubled, _ = model_with(params, mode="sparse", impl="xla", summary_self_weight=2.0)
    assert np.abs(run(doubled, lay=one_shot) - expected).max() > 1e-3 * np.abs(expected).max()


def test_independent_equals_each_shot_run_alone_with_its_caption_window():
    """Two films with different cuts; each shot alone sees global + its own window + padding.
    Per-shot runs start RoPE frame positions at 0: RoPE is relative, so the offset cancels."""
    model, params = model_with(mode="independent", impl="xla", block_q=8, block_kv=8)
    cuts = [[2, 4], [3]]
    batch = ShotLayout.stack([layout(c, windows=WINDOWS[: len(c) + 2], pad_start=PAD_START)
                              for c in cuts])
    joint = run(model, lay=batch)
    alone, _ = model_with(params, mode="full")
    for b, film_cuts in enumerate(cuts):
        bounds = [0, *film_cuts, F]
        for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            own = layout([], end - start, windows=WINDOWS[[0, s + 1]], pad_start=PAD_START)
            out = run(alone, LATENTS[b:b + 1, start:end], TIMESTEPS[b:b + 1], TEXT[b:b + 1],
                      ShotLayout.stack([own]))
            assert_close(joint[b:b + 1, start:end], out)


def test_sparse_model_xla_matches_reference_with_gradients():
    lay = ShotLayout.stack([layout([2, 4], windows=WINDOWS, pad_start=PAD_START),
                            layout([1], windows=WINDOWS[:3], pad_start=PAD_START)])
    results = []
    for impl in ("xla", "reference"):
        model, params = model_with(None if not results else results[0][2], mode="sparse",
                                   impl=impl, block_q=8, block_kv=8)
        graphdef = nnx.graphdef(model)

        def loss(p):
            out = nnx.merge(graphdef, p)(LATENTS, TIMESTEPS, TEXT, lay)
            return jnp.mean(out * jnp.cos(out))

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        results.append((value, grads, params))
    (v0, g0, _), (v1, g1, _) = results
    np.testing.assert_allclose(v0, v1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert_close(np.asarray(a), np.asarray(b))


def test_layout_must_match_the_token_grid():
    model, _ = model_with()
    with pytest.raises(ValueError, match="5 latent frames x 6 tokens but the latents give 6 x 6"):
        run(model, lay=ShotLayout.stack([layout([2], num_frames=5)] * 2))


def test_train_step_compiles_once_for_20_random_layouts():
    """The layout is data: new cuts and text windows reuse the compiled step."""
    model, params = model_with(mode="sparse", impl="xla", block_q=8, block_kv=8)
    graphdef = nnx.graphdef(model)

    @jax.jit
    def step(params, latents, timesteps, text, lay):
        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(latents, timesteps, text, lay) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), value

    draw = np.random.default_rng(1)
    for _ in range(20):
        films = []
        for _ in range(2):
            k = int(draw.integers(1, 5))
            cuts = sorted(draw.choice(np.arange(1, F), size=k - 1, replace=False).tolist())
            ends = np.sort(draw.choice(np.arange(1, TEXT_LEN), size=k + 1, replace=False))
            windows = np.stack([np.r_[0, ends[:-1]], ends], axis=1).astype(np.int32)
            films.append(layout(cuts, windows=windows, pad_start=int(ends[-1])))
        params, value = step(params, LATENTS, TIMESTEPS, TEXT, ShotLayout.stack(films))
        assert np.isfinite(value)
    assert step._cache_size() == 1
    # The counter does see a genuine shape change (a layout of other maxima).
    other = ShotLayout.from_latent_cuts(F, [2], latent_hw=HW, max_shots=5)
    step(params, LATENTS, TIMESTEPS, TEXT, ShotLayout.stack([other] * 2))
    assert step._cache_size() == 2
