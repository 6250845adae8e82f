"""Schedulers against independent references: diffusers' flow UniPC, DiffSynth's Euler formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from holocine_jax.sample.schedulers import make_scheduler

SHAPE = (2, 3, 4, 5)


def velocity(x, i, dtype):
    """A deterministic stand-in model output that depends on the sample and the step."""
    g = np.random.default_rng(100 + i)
    return (0.7 * x + g.standard_normal(SHAPE)).astype(dtype)


def run_ours(sched, x, dtype, jit=True):
    step = jax.jit(sched.step) if jit else sched.step
    x = jnp.asarray(x, dtype)
    state = sched.init_state(x)
    out = []
    for i in range(sched.num_steps):
        x, state = step(state, jnp.asarray(velocity(np.asarray(x), i, dtype)), i, x)
        out.append(np.asarray(x))
    return out


def run_diffusers(ref, x, dtype):
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    x = torch.from_numpy(x.astype(dtype)).to(tdtype)
    out = []
    for i, t in enumerate(ref.timesteps):
        v = torch.from_numpy(velocity(x.numpy(), i, dtype))
        x = ref.step(v, t, x).prev_sample
        out.append(x.numpy())
    return out


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 2e-6), (np.float32, 2e-5)])
def test_unipc_matches_diffusers(order, dtype, tol):
    steps, shift = 12, 5.0
    ref = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                  flow_shift=shift, solver_order=order)
    ref.set_timesteps(steps)
    ours = make_scheduler("unipc", num_steps=steps, shift=shift, order=order)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    x = np.random.default_rng(order).standard_normal(SHAPE)
    with jax.enable_x64(dtype == np.float64):
        got = run_ours(ours, x, dtype)
    want = run_diffusers(ref, x, dtype)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max(), err_msg=f"step {i}")
    # The final step to sigma 0 returns the x0 prediction of the last model output.
    assert np.isfinite(got[-1]).all()


def test_unipc_bh1_and_final_step_is_x0():
    ref = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                  flow_shift=3.0, solver_order=2, solver_type="bh1")
    ref.set_timesteps(6)
    ours = make_scheduler("unipc", num_steps=6, shift=3.0, order=2, solver_type="bh1")
    x = np.random.default_rng(7).standard_normal(SHAPE)
    with jax.enable_x64(True):
        got = run_ours(ours, x, np.float64, jit=False)
    want = run_diffusers(ref, x, np.float64)
    for g, w in zip(got[:-1], want[:-1]):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-6)
    # diffusers' bh1 step to sigma 0 evaluates B(h) = -h = -inf and returns NaN; ours is finite.
    assert np.isnan(want[-1]).all() and np.isfinite(got[-1]).all()
    # x_N = x_{N-1} - sigma_{N-1} v_{N-1}: the x0 prediction (flow convention).
    prev = got[-2]
    expected = prev - ours.sigmas[-2].astype(np.float64) * velocity(prev, 5, np.float64)
    np.testing.assert_allclose(got[-1], expected, rtol=1e-12, atol=1e-12)


def test_unipc_wan_grid():
    """The official FlowUniPCMultistepScheduler grid: linspace(0.999, 0) shifted, t truncated."""
    n, shift = 50, 5.0
    ours = make_scheduler("unipc", num_steps=n, shift=shift, grid="wan")
    s = torch.linspace(float(torch.tensor(0.999, dtype=torch.float32)), 0.0, n + 1,
                       dtype=torch.float64)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    np.testing.assert_allclose(ours.sigmas[:-1], s.numpy(), rtol=1e-7)
    assert ours.sigmas[-1] == 0
    np.testing.assert_array_equal(ours.timesteps, (s * 1000).to(torch.int64).numpy())
    diffusers_grid = make_scheduler("unipc", num_steps=n, shift=shift)
    assert not np.array_equal(ours.sigmas, diffusers_grid.sigmas)  # the two grids differ


@pytest.mark.parametrize("steps,shift", [(10, 5.0), (50, 5.0), (7, 1.0)])
def test_euler_matches_diffsynth_formula(steps, shift):
    """DiffSynth FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True), written out."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    ours = make_scheduler("euler", num_steps=steps, shift=shift)
    np.testing.assert_allclose(ours.sigmas[:-1], sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.timesteps, timesteps.numpy(), rtol=1e-6, atol=1e-4)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    got = run_ours(ours, x, np.float32)
    xt = torch.from_numpy(x)
    for i in range(steps):
        v = torch.from_numpy(velocity(xt.numpy(), i, np.float32))
        sigma_next = sigmas[i + 1] if i + 1 < steps else torch.tensor(0.0)
        xt = xt + v * (sigma_next - sigmas[i])
        np.testing.assert_allclose(got[i], xt.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"step {i}")


@pytest.mark.parametrize("name,grid", [("euler", "diffusers"), ("unipc", "diffusers"),
                                       ("unipc", "wan")])
def test_a14b_switch_26_high_14_low(name, grid):
    sched = make_scheduler(name, num_steps=40, shift=12.0, grid=grid)
    experts = sched.expert_of_step(0.875, 2)
    assert (experts == 0).sum() == 26 and (experts == 1).sum() == 14
    assert np.all(np.diff(experts) >= 0)  # high first, then low, one switch
    assert np.all(sched.timesteps[experts == 0] >= 875)
    assert np.all(sched.expert_of_step(0.875, 1) == 0)


def test_step_jits_with_traced_index_in_fori_loop():
    sched = make_scheduler("unipc", num_steps=8, shift=5.0, order=3)
    x = jnp.ones(SHAPE, jnp.float32)

    def body(i, carry):
        x, state = carry
        return sched.step(state, 0.5 * x, i, x)

    looped, _ = jax.lax.fori_loop(0, 8, body, (x, sched.init_state(x)))
    state, y = sched.init_state(x), x
    for i in range(8):
        y, state = sched.step(state, 0.5 * y, i, y)
    np.testing.assert_allclose(looped, y, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="ddim", num_steps=4, shift=1.0), "unknown scheduler"),
    (dict(name="unipc", num_steps=0, shift=1.0), "num_steps"),
    (dict(name="unipc", num_steps=4, shift=1.0, order=4), "order"),
    (dict(name="unipc", num_steps=4, shift=1.0, grid="x"), "grid"),
    (dict(name="euler", num_steps=4, shift=0.0), "shift"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_scheduler(kwargs.pop("name"), **kwargs)
