"""LoRA training on the tiny model: only the adapters change, the loss falls, the optimizer holds
state for the adapters alone, the checkpoint holds the adapters and names its base, and a run
killed with SIGKILL mid-step resumes bit-identical. Plus the adapter rules in the model: a fresh
adapter is the identity, per-shot adapters leave other shots exactly untouched when shots do not
attend to each other."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from holocine_jax.checkpoint import load_config_json, load_params, save_params
from holocine_jax.model import WanDiT
from holocine_jax.model.lora import LoRASpec, lora_linears
from holocine_jax.model.transformer import base_params, merge_lora, with_lora
from holocine_jax.shots import ShotLayout
from holocine_jax.train.checkpointing import TrainCheckpointer
from holocine_jax.train.loop import initial_model
from holocine_jax.train.metrics import read_metrics
from holocine_jax.train.state import init_train_state, split_model

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from resume_worker import worker_config  # noqa: E402
from test_resume import complete_steps, run_and_kill, run_to_end  # noqa: E402

STEPS = 12


def randomized(model, seed):
    """Wan zero-initialises proj_out (output 0, no gradient into the blocks): give it weights."""
    kernel = model.proj_out.kernel
    kernel[...] = jnp.asarray(np.random.default_rng(seed).standard_normal(kernel.shape) * 0.2,
                              kernel[...].dtype)
    return model


def leaves(state):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base_dir = str(root / "base")
    config = worker_config()
    save_params(randomized(initial_model(config), 3), base_dir, config)
    overrides = (f"train.init_from={base_dir}", "train.lora.rank=4", "train.lora.alpha=8",
                 "train.learning_rate=0.02")
    cache = str(root / "jax_cache")
    straight = str(root / "straight")
    run_to_end(straight, cache, *overrides)
    return base_dir, straight, (root, cache, overrides), worker_config(*overrides)


def restore(ckpt_dir, config):
    graphdef, params, frozen, _ = split_model(initial_model(config))
    with TrainCheckpointer(ckpt_dir, config) as ckpt:
        abstract = jax.eval_shape(lambda p, f: init_train_state(config, p, f), params, frozen)
        return ckpt.restore(abstract, frozen=frozen)[0]


def test_only_adapters_train_and_the_loss_falls(lora_runs):
    base_dir, straight, _, config = lora_runs
    ckpt_dir = os.path.join(straight, "checkpoints")
    start, trained = initial_model(config), load_params(ckpt_dir)   # load_params: base + adapters
    base = leaves(nnx.state(load_params(base_dir), nnx.Param))
    assert leaves(base_params(trained)).keys() == base.keys()
    for key, value in leaves(base_params(trained)).items():   # every base leaf: bit-identical
        assert np.array_equal(value, base[key]), key
    before, after = leaves(nnx.state(start, nnx.LoRAParam)), leaves(nnx.state(trained, nnx.LoRAParam))
    assert len(after) == 2 * 10   # lora_a + lora_b on each of the 10 default targets
    for key, value in after.items():                          # every adapter leaf moved
        assert not np.array_equal(value, before[key]), key
    # the checkpoint's params item holds the adapters alone; its config names the base
    assert load_config_json(ckpt_dir).train.init_from == base_dir
    # the flow-matching loss on fixed batches, noise and timesteps falls (the logged per-step
    # losses are too noisy over 12 steps: each step draws its own timesteps)
    after_loss, before_loss = fixed_loss(trained), fixed_loss(start)
    assert after_loss < 0.85 * before_loss, (after_loss, before_loss)


def fixed_loss(model, batches=4):
    from resume_worker import NumberedBatches
    data, losses, forward = NumberedBatches(), [], nnx.jit(lambda m, *a: m(*a))
    for i in range(batches):
        batch = next(data)
        x0 = jnp.asarray(batch["latents"])
        noise = jax.random.normal(jax.random.key(i), x0.shape)
        for sigma in (0.25, 0.5, 0.75):
            pred = forward(model, (1 - sigma) * x0 + sigma * noise, jnp.full((2,), 1000 * sigma),
                         jnp.asarray(batch["text_states"]), batch["layout"])
            losses.append(float(jnp.mean((pred - (noise - x0)) ** 2)))
    return float(np.mean(losses))


def test_optimizer_state_is_the_adapters_size(lora_runs):
    _, straight, _, config = lora_runs
    state = restore(os.path.join(straight, "checkpoints"), config)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if x.ndim)
    adapters, frozen, opt = nbytes(state.params), nbytes(state.frozen), nbytes(state.opt_state)
    assert opt == 2 * adapters                # AdamW mu + nu of the adapters, nothing of the base
    assert frozen > 10 * adapters and nbytes(state.ema) == adapters


@pytest.mark.slow   # ~30 s of subprocess training; test_resume.py covers the default run's kill -9
def test_lora_resume_after_kill_is_bit_identical(lora_runs):
    _, straight, (root, cache, overrides), config = lora_runs
    killed = str(root / "killed")
    run_and_kill(killed, cache, 5, 0.02, *overrides)   # mid-step 5, after the save of step 3
    run_to_end(killed, cache, *overrides)
    assert complete_steps(os.path.join(killed, "checkpoints"))[-1] == STEPS
    a = restore(os.path.join(straight, "checkpoints"), config)
    b = restore(os.path.join(killed, "checkpoints"), config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    curves = [read_metrics(os.path.join(d, "metrics.jsonl")) for d in (straight, killed)]
    assert [curves[0][s]["train/loss"] for s in range(1, STEPS + 1)] == \
        [curves[1][s]["train/loss"] for s in range(1, STEPS + 1)]


def inputs(layout_fn):
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((1, 5, 8, 8, 16)), jnp.float32)
    text = jnp.asarray(r.standard_normal((1, 64, 32)), jnp.float32)
    return x, jnp.array([500.0]), text, layout_fn()


def trained_adapters(model, seed):
    r = np.random.default_rng(seed)
    for linear in lora_linears(model).values():
        linear.lora_b[...] = jnp.asarray(r.standard_normal(linear.lora_b.shape) * 0.1, jnp.float32)
    return model


@pytest.mark.parametrize("mode", ["independent", "sparse"])
def test_per_shot_adapter_touches_only_its_shots(mode):
    config = worker_config(f"attention.mode={mode}")
    base = randomized(WanDiT.from_config(config, rngs=nnx.Rngs(0)), 1)
    model = trained_adapters(with_lora(base, LoRASpec(rank=4, alpha=4), rngs=nnx.Rngs(1)), 2)
    x, t, text, layout = inputs(lambda: ShotLayout.from_latent_cuts(
        5, [2], latent_hw=(4, 4), max_shots=4, text_windows=[(0, 8), (8, 40), (40, 64)],
        text_pad_start=64))
    y_base, y_all = base(x, t, text, layout), model(x, t, text, layout)
    model.set_lora_shots([(1,)] * 4)                  # every rank column on shot 1 only
    y_shot = model(x, t, text, layout)
    shot0 = np.asarray(layout.frame_to_shot()) == 0   # latent frames 0-1
    diff0 = float(jnp.abs(y_shot - y_base)[:, shot0].max())
    diff1 = float(jnp.abs(y_shot - y_base)[:, ~shot0].max())
    assert float(jnp.abs(y_all - y_base)[:, shot0].max()) > 1e-3   # the adapter is not a no-op
    assert diff1 > 1e-3
    if mode == "independent":
        assert diff0 == 0.0                          # exactly the base model on shot 0
    else:
        assert diff0 > 0.0                           # shot 0 reads shot 1's summary tokens
    model.set_lora_shots(None)
    assert np.array_equal(model(x, t, text, layout), y_all)


def test_fresh_adapters_are_the_identity_and_merge_equals_unmerged():
    config = worker_config()
    base = randomized(WanDiT.from_config(config, rngs=nnx.Rngs(0)), 1)
    x, t, text, layout = inputs(lambda: ShotLayout.from_latent_cuts(5, [2], latent_hw=(4, 4), max_shots=4))
    model = with_lora(base, LoRASpec(rank=3, alpha=6, targets=("attn1.to_q", "ffn.net.2")),
                      rngs=nnx.Rngs(1))
    assert set(lora_linears(model)) == {("blocks", "attn1", "to_q"), ("blocks", "ffn", "net", 2)}
    assert np.array_equal(model(x, t, text, layout), base(x, t, text, layout))
    trained_adapters(model, 3)
    y = model(x, t, text, layout)
    merged = merge_lora(model)
    assert not lora_linears(merged)
    np.testing.assert_allclose(merged(x, t, text, layout), y, rtol=0, atol=1e-5 * float(jnp.abs(y).max()))
    with pytest.raises(ValueError, match="unknown"):
        LoRASpec(rank=2, targets=("attn1.to_z",))
