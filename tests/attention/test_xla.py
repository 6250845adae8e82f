"""Property test: the blocked XLA executor equals the reference (outputs and q/k/v gradients)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from holocine_jax.attention import shot_attention
from holocine_jax.shots import ShotLayout

H, D = 2, 8


def random_layouts(rng, n, *, frames, hw, max_shots, summary_frames=1):
    """n layouts: 1..max_shots shots, uneven, cuts anywhere (so shots straddle blocks)."""
    layouts = []
    while len(layouts) < n:
        shots = int(rng.integers(1, max_shots + 1))
        cuts = sorted(rng.choice(np.arange(1, frames), shots - 1, replace=False).tolist())
        if min(np.diff([0] + cuts + [frames])) >= summary_frames:
            layouts.append(ShotLayout.from_latent_cuts(frames, cuts, latent_hw=hw,
                                                       max_shots=max_shots,
                                                       summary_frames=summary_frames))
    return layouts


@functools.partial(jax.jit, static_argnames=("mode", "impl", "weight", "block_q", "block_kv"))
def out_and_grads(q, k, v, ct, layout, mode, impl, weight, block_q, block_kv):
    def loss(q, k, v):
        out = shot_attention(q, k, v, layout, mode=mode, impl=impl, summary_self_weight=weight,
                             block_q=block_q, block_kv=block_kv)
        return jnp.sum(out * ct), out
    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return (out,) + grads


def rel_err(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def check(rng, layouts, mode, weight, block_q, block_kv, tol=1e-5):
    layout = ShotLayout.stack(layouts)
    b, length = len(layouts), layouts[0].num_tokens
    q, k, v, ct = (jnp.asarray(rng.standard_normal((b, length, H, D)), jnp.float32)
                   for _ in range(4))
    kw = dict(mode=mode, weight=weight, block_q=block_q, block_kv=block_kv)
    ours = out_and_grads(q, k, v, ct, layout, impl="xla", **kw)
    want = out_and_grads(q, k, v, ct, layout, impl="reference", **kw)
    for name, a, w in zip(("out", "dq", "dk", "dv"), ours, want):
        err = rel_err(a, w)
        assert err <= tol, (name, err, [l.latent_cuts() for l in layouts])


@pytest.mark.parametrize("mode", ["sparse", "full", "independent"])
def test_xla_equals_reference_on_210_random_layouts(mode):
    # F=13 latent frames of 3 tokens: L=39, blocks of 8 x 5 (neither divides L), up to 8 shots.
    rng = np.random.default_rng({"sparse": 0, "full": 1, "independent": 2}[mode])
    layouts = random_layouts(rng, 210, frames=13, hw=(1, 3), max_shots=8)
    for i in range(0, 210, 30):
        check(rng, layouts[i:i + 30], mode, 2.0, 8, 5)


def test_clean_mask_and_longer_summaries():
    rng = np.random.default_rng(7)
    layouts = random_layouts(rng, 30, frames=14, hw=(2, 2), max_shots=5, summary_frames=2)
    check(rng, layouts, "sparse", 1.0, 12, 16)
    check(rng, layouts, "sparse", 3.0, 56, 56)  # one block pair


def test_bfloat16_runs_close_to_reference():
    rng = np.random.default_rng(1)
    layout = ShotLayout.stack(random_layouts(rng, 4, frames=13, hw=(1, 3), max_shots=4))
    q, k, v = (jnp.asarray(rng.standard_normal((4, 39, H, D)), jnp.bfloat16) for _ in range(3))
    attend = jax.jit(shot_attention, static_argnames=("impl", "block_q", "block_kv"))
    ours = attend(q, k, v, layout, impl="xla", block_q=8, block_kv=8)
    want = attend(q, k, v, layout, impl="reference")
    assert ours.dtype == jnp.bfloat16
    assert rel_err(ours.astype(jnp.float32), want.astype(jnp.float32)) < 2e-2


def test_train_step_compiles_once_for_20_layouts():
    rng = np.random.default_rng(5)
    traces = []

    @jax.jit
    def train_step(q, k, v, layout):
        traces.append(1)
        loss = lambda q, k, v: jnp.mean(shot_attention(q, k, v, layout, block_q=8, block_kv=8) ** 2)
        return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

    q, k, v = (jnp.asarray(rng.standard_normal((2, 39, H, D)), jnp.float32) for _ in range(3))
    layouts = random_layouts(rng, 40, frames=13, hw=(1, 3), max_shots=8)
    seen = set()
    for i in range(20):
        pair = ShotLayout.stack(layouts[2 * i:2 * i + 2])
        seen.add(tuple(map(tuple, np.asarray(pair.shot_starts))))
        loss, _ = train_step(q, k, v, pair)
        assert np.isfinite(float(loss))
    assert len(seen) == 20 and len(traces) == 1 and train_step._cache_size() == 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sparse", "full", "independent"])
def test_xla_equals_reference_sweep(mode):
    rng = np.random.default_rng(11)
    for frames, hw, shots, bq, bk in [(31, (2, 3), 13, 32, 24), (21, (3, 5), 8, 64, 48)]:
        layouts = random_layouts(rng, 400, frames=frames, hw=hw, max_shots=shots)
        for i in range(0, 400, 40):
            check(rng, layouts[i:i + 40], mode, 2.0, bq, bk)
