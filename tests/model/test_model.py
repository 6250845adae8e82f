"""WanDiT properties: layer scan == unrolled, remat keeps gradients, axes on every parameter,
HLO size independent of depth, bfloat16 compute close to float32, shape errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from convert.test_roundtrip import random_model
from holocine_jax.model import WanDiT
from holocine_jax.model.rope import rope_split, rope_tables

LATENTS = np.random.default_rng(0).standard_normal((2, 3, 4, 6, 16)).astype(np.float32)
TIMESTEPS = np.array([5.0, 700.0], np.float32)
TEXT = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)


def loss_and_grads(model):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(LATENTS, TIMESTEPS, TEXT) ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


def same_params(config, **model_fields):
    """A model built from `config` with `model_fields` changed, holding `random_model`'s weights."""
    base = random_model(config)
    other = WanDiT.from_config(tiny_config(**model_fields), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(base, nnx.Param))
    return base, other


@pytest.mark.parametrize("fields", [pytest.param(dict(scan_layers=False), marks=pytest.mark.slow),
                                    pytest.param(dict(remat="nothing_saveable"), marks=pytest.mark.slow),
                                    pytest.param(dict(remat="dots_saveable"), marks=pytest.mark.slow)])
def test_unrolled_and_remat_match_scan(fields):
    base, other = same_params(tiny_config(num_layers=3), num_layers=3, **fields)
    (l0, g0), (l1, g1) = loss_and_grads(base), loss_and_grads(other)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert np.abs(np.asarray(b) - np.asarray(a)).max() <= 1e-5 * np.abs(np.asarray(a)).max()


def test_every_parameter_has_logical_axes():
    model = nnx.eval_shape(lambda: WanDiT.from_config(tiny_config(), rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.get_value().ndim, (path, axes)
        assert (axes[0] == "layers") == (path[0] == "blocks"), (path, axes)


def test_compiled_program_size_does_not_grow_with_depth():
    def hlo_size(num_layers):
        model = nnx.eval_shape(lambda: WanDiT.from_config(tiny_config(num_layers=num_layers), rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(model)
        fwd = jax.jit(lambda p, x, t, s: nnx.merge(graphdef, p)(x, t, s))
        return len(fwd.lower(params, LATENTS, TIMESTEPS, TEXT).as_text())

    assert hlo_size(8) < 1.05 * hlo_size(2)


def test_bfloat16_compute_is_close_to_float32():
    config = tiny_config()
    f32, bf16 = same_params(config, dtype="bfloat16")
    run = nnx.jit(lambda m: m(LATENTS, TIMESTEPS, TEXT))
    ref, out = np.asarray(run(f32)), run(bf16)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert err < 0.05, err


def test_rope_split_and_tables():
    assert rope_split(128) == (44, 42, 42)
    cos, sin = rope_tables(128, (3, 2, 4))
    # token (f=2, y=1, x=3): first frame pair rotates by 2 rad, first height pair by 1, width by 3.
    token = 2 * 8 + 1 * 4 + 3
    np.testing.assert_allclose([cos[token, 0], cos[token, 22], cos[token, 43]],
                               np.cos([2.0, 1.0, 3.0]), rtol=1e-6)
    np.testing.assert_allclose(sin[token, 1], np.sin(2.0 * 10000 ** (-2 / 44)), rtol=1e-6)


def test_latents_not_divisible_by_patch_are_named():
    model = WanDiT.from_config(tiny_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\(2, 3, 5, 6, 16\).*patch size \(1, 2, 2\)"):
        model(np.zeros((2, 3, 5, 6, 16), np.float32), TIMESTEPS, TEXT)
