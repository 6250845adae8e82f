"""The sharded train step on 8 fake CPU devices equals the single-device step (issue 6, issue 9):
same loss and gradients (f32, rel err <= 1e-5) for every acceptance mesh and attention mode, with
random layouts whose shots straddle the context shards; parameters and optimizer state are
sharded by the logical-axis rules; bad meshes fail before compiling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from holocine_jax.model import WanDiT
from holocine_jax.parallel import batch_shardings, make_mesh, state_shardings
from holocine_jax.shots import ShotLayout
from holocine_jax.train.state import init_train_state, split_model
from holocine_jax.train.step import make_gradient_fn, make_train_step

MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), (1, 2, 4, 1), (1, 1, 8, 1), (1, 2, 2, 2)]
# Default run: data parallelism and shot_aware context parallelism through the model (the
# fsdp x context x tensor mesh with ulysses is the train-step test below; every mode and both
# strategies on every mesh kind run at the attention level in tests/attention/test_context.py);
# `pytest -m slow` runs every mesh x mode x strategy here (~30 s each on 2 cores).
FAST = []   # all under `slow` (test budget); the default run keeps the sharded train step
CASES = [pytest.param(m, mode, s, id=f"{'x'.join(map(str, m))}-{mode}-{s}",
                      marks=() if (m, mode, s) in FAST else pytest.mark.slow)
         for m in MESHES for mode in ("sparse", "full", "independent")
         for s in ("ulysses", "shot_aware")]
B, F, HW = 8, 6, (4, 4)          # 6 latent frames of 4x4 tokens: L = 96, 12 tokens per shard at 8
TEXT_LEN, MAX_SHOTS = 12, 4


def config(mode, mesh=(1, 1, 1, 1), strategy="ulysses", **attention):
    c = tiny_config(num_layers=1, num_heads=8)            # head_dim 8: 8 heads split over 8 shards
    c.attention.update(mode=mode, impl="xla", block_q=16, block_kv=16, context_strategy=strategy,
                       **attention)
    c.mesh.update(dict(zip(("data", "fsdp", "context", "tensor"), mesh)))
    c.train.update(ema_decay=0.9, warmup_steps=0, caption_dropout=0.0)
    return c


def random_layouts(seed):
    """B films with 1-4 shots at random latent cuts and random caption windows."""
    rng = np.random.default_rng(seed)
    films = []
    for _ in range(B):
        k = int(rng.integers(1, MAX_SHOTS + 1))
        cuts = sorted(rng.choice(np.arange(1, F), size=k - 1, replace=False).tolist())
        bounds = np.sort(rng.choice(np.arange(1, TEXT_LEN - 1), size=k + 1, replace=False))
        windows = np.stack([np.r_[0, bounds[:-1]], bounds], axis=1)[: k + 1].astype(np.int32)
        films.append(ShotLayout.from_latent_cuts(F, cuts, latent_hw=HW, max_shots=MAX_SHOTS,
                                                 text_windows=windows,
                                                 text_pad_start=int(bounds[-1])))
    return ShotLayout.stack(films)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return dict(latents=jnp.asarray(rng.standard_normal((B, F, 8, 8, 16)), jnp.float32),
                text_states=jnp.asarray(rng.standard_normal((B, TEXT_LEN, 32)), jnp.float32),
                layout=random_layouts(seed))


def initial_state(c):
    model = WanDiT.from_config(c, rngs=nnx.Rngs(0))
    graphdef, params, _, rest = split_model(model)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)
    return graphdef, rest, init_train_state(c, params)


def sharded(fn, c, state, data, out_state=False):
    """fn(state, batch) jitted over the config's mesh with the rule-table shardings."""
    mesh = make_mesh(c.mesh)
    with jax.set_mesh(mesh):
        state_sh = state_shardings(jax.eval_shape(lambda: state), mesh, c.mesh.rules)
        batch_sh = batch_shardings(data, mesh, c.mesh.rules)
        out = (state_sh, None) if out_state else None
        return jax.jit(fn, in_shardings=(state_sh, batch_sh), out_shardings=out)(
            jax.device_put(state, state_sh), jax.device_put(data, batch_sh)), state_sh


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def assert_trees_close(actual, expected, tol=1e-5):
    errors = jax.tree.leaves(jax.tree.map(rel_err, actual, expected))
    assert max(errors) <= tol, f"max relative error {max(errors):.2e} > {tol}"


@pytest.mark.parametrize("mesh, mode, strategy", CASES)
def test_sharded_gradients_equal_single_device(mesh, mode, strategy):
    single = config(mode)
    graphdef, rest, state = initial_state(single)
    data = batch(seed=sum(mesh))
    grads, aux = jax.jit(make_gradient_fn(single, graphdef, rest))(state, data)
    c = config(mode, mesh, strategy)
    (grads_sh, aux_sh), _ = sharded(make_gradient_fn(c, graphdef, rest), c, state, data)
    assert_trees_close(aux_sh["sample_loss"], aux["sample_loss"])
    assert_trees_close(grads_sh, grads)


def test_sharded_train_step_shards_state_and_equals_single_device():
    single = config("sparse")
    graphdef, rest, state = initial_state(single)
    data = batch(seed=3)
    new, metrics = jax.jit(make_train_step(single, graphdef, rest))(state, data)
    c = config("sparse", (1, 2, 2, 2))
    (new_sh, metrics_sh), state_sh = sharded(make_train_step(c, graphdef, rest), c, state, data,
                                             out_state=True)
    for key in ("loss", "grad_norm", "param_norm"):
        assert rel_err(metrics_sh[key], metrics[key]) <= 1e-5, key
    assert_trees_close(new_sh.opt_state[1][0].mu, new.opt_state[1][0].mu)   # = (1 - b1) * grads
    # Adam's first step is lr * g / (|g| + eps): entries with |g| near eps amplify f32
    # reduction-order noise, so the updated parameters get a looser bound than the gradients.
    assert_trees_close(new_sh.params, new.params, tol=1e-4)
    # the rule table reached parameters and Adam moments: [layers, embed, heads] -> (fsdp x
    # context, tensor)
    q = new_sh.params["blocks"]["attn1"]["to_q"]["kernel"].get_value()
    assert q.sharding.spec == P(None, ("fsdp", "context"), "tensor")
    mu = new_sh.opt_state[1][0].mu["blocks"]["attn1"]["to_q"]["kernel"].get_value()
    assert mu.sharding.spec == P(None, ("fsdp", "context"), "tensor")
    assert q.addressable_shards[0].data.shape == (1, 16, 32)


def test_bad_meshes_fail_before_compiling():
    with pytest.raises(ValueError, match="product must equal the device count"):
        make_mesh(config("sparse", (2, 2, 1, 1)).mesh)
    with pytest.raises(ValueError, match="at most one -1"):
        make_mesh(config("sparse", (-1, -1, 1, 1)).mesh)
    c = config("sparse", (1, 8, 1, 1))
    mesh = make_mesh(c.mesh)
    data = batch()
    data["latents"] = data["latents"][:6]
    with pytest.raises(ValueError, match="batch size 6 .* not divisible by the 8 batch shards"):
        batch_shardings(data, mesh, c.mesh.rules)
