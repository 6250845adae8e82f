"""Flow-matching sampling schedulers (DESIGN §11): `euler` (HoloCine's) and flow `unipc`.

Both are a sigma grid plus a jittable, table-driven update:

    sched = make_scheduler("unipc", num_steps=50, shift=5.0)   # .sigmas [N+1], .timesteps [N]
    state = sched.init_state(x)                                # x: [B, ...] noise
    for i in range(sched.num_steps):                           # i may be a traced index
        v = model(x, sched.timesteps[i])                       # flow prediction (noise - x0)
        x, state = sched.step(state, v, i, x)

Flow convention: x_sigma = (1 - sigma) x0 + sigma eps; the model predicts v = eps - x0, so the
x0 prediction is x - sigma v. Grids (shift(s) = k s / (1 + (k-1) s)):
- `euler` (DiffSynth's FlowMatchScheduler as HoloCine configures it: sigma_min 0, extra one
  step): sigma_i = shift(linspace(1, 0, N+1)[i]), t = 1000 sigma (float); x += v (sigma_next -
  sigma), the last sigma_next = 0.
- `unipc`, grid "diffusers" (UniPCMultistepScheduler with use_flow_sigmas, flow_prediction,
  flow_shift): sigma_i = shift(linspace(1, 1/1000, N+1)[i]), the first lowered by 1e-6 when it is
  1; grid "wan" (the official FlowUniPCMultistepScheduler): shift(linspace(0.999, 0, N+1)[i]).
  Both truncate t = 1000 sigma to an integer and append a final sigma 0.

UniPC (bh1/bh2, x0 prediction, orders 1-3, warm-up and lower order at the end as diffusers does):
every update is linear in the last corrected sample, the current sample and the last few x0
predictions, with coefficients that depend only on the grid. They are computed once on the host
in float64; `step` gathers row `i` and takes a weighted sum, so it jits with a traced `i`. The
final step (to sigma 0) is order 1 and returns the x0 prediction exactly: no log(0) anywhere.
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from holocine_jax.flow import NUM_TRAIN_TIMESTEPS, shift_sigma

SCHEDULERS = ("euler", "unipc")
UNIPC_GRIDS = ("diffusers", "wan")


def flow_grid(kind: str, num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [N+1] float32 ending in 0, timesteps [N] float32) of a grid (module docstring)."""
    n = num_steps
    if kind == "euler":
        s = shift_sigma(np.linspace(1.0, 0.0, n + 1)[:-1], shift)
        t = (s.astype(np.float32) * np.float32(NUM_TRAIN_TIMESTEPS))
    elif kind in UNIPC_GRIDS:
        if kind == "diffusers":
            s = shift_sigma(np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, n + 1)[:-1], shift)
            if abs(s[0] - 1.0) < 1e-6:  # keeps log(alpha) finite at the first steps
                s[0] -= 1e-6
        else:  # the official scheduler's sigma_max is float32(1 - 1/1000) read back as a float
            sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
            s = shift_sigma(np.linspace(sigma_max, 0.0, n + 1)[:-1], shift)
        t = (s * NUM_TRAIN_TIMESTEPS).astype(np.int64).astype(np.float32)
    else:
        raise ValueError(f"unknown sigma grid {kind!r}")
    return np.append(s, 0.0).astype(np.float32), t


@dataclasses.dataclass(frozen=True, eq=False)
class FlowScheduler:
    """A sampling schedule: sigmas [N+1] (last 0) and the model's timesteps [N] (0..1000)."""
    name: str
    sigmas: np.ndarray
    timesteps: np.ndarray

    def __post_init__(self):
        for f in dataclasses.fields(self):  # shared through make_scheduler's cache: read-only
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value.setflags(write=False)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def expert_of_step(self, boundary: float, num_experts: int) -> np.ndarray:
        """[N] expert index per step: 0 (high noise) while t >= boundary * 1000, then 1."""
        if num_experts == 1:
            return np.zeros(self.num_steps, np.int32)
        if num_experts != 2:
            raise ValueError(f"expert switching supports 1 or 2 experts, got {num_experts}")
        return (self.timesteps < boundary * NUM_TRAIN_TIMESTEPS).astype(np.int32)

    def init_state(self, sample):
        """The solver state before step 0 (a pytree of arrays shaped like `sample`).

        Subclasses add `step(state, model_output, t_index, sample) -> (next sample, state)`:
        one update from sigmas[t_index] to sigmas[t_index + 1].
        """
        return ()


@dataclasses.dataclass(frozen=True, eq=False)
class EulerScheduler(FlowScheduler):
    """x <- x + v (sigma_next - sigma), exactly HoloCine's (DiffSynth FlowMatchScheduler) step."""

    def step(self, state, model_output, t_index, sample):
        sig = jnp.asarray(self.sigmas)
        d_sigma = (sig[t_index + 1] - sig[t_index]).astype(sample.dtype)
        return sample + model_output.astype(sample.dtype) * d_sigma, state


@dataclasses.dataclass(frozen=True, eq=False)
class UniPCScheduler(FlowScheduler):
    """Flow UniPC multistep (x0 prediction). Tables, row i = step i, history slot k = m_{i-k}:

    corrector: x_c = corr_last[i] x_last + corr_self[i] x + sum_k corr_m[i, k] m_{i-k};
    predictor: x_next = pred_x[i] x_c + sum_k pred_m[i, k] m_{i-k}.
    """
    order: int = 2
    corr_last: np.ndarray = None
    corr_self: np.ndarray = None
    corr_m: np.ndarray = None
    pred_x: np.ndarray = None
    pred_m: np.ndarray = None

    def init_state(self, sample):
        """(last corrected sample [B, ...], x0 history [order+1, B, ...])."""
        return jnp.zeros_like(sample), jnp.zeros((self.order + 1,) + sample.shape, sample.dtype)

    def step(self, state, model_output, t_index, sample):
        last, history = state
        dtype = sample.dtype
        row = lambda table: jnp.asarray(table, dtype)[t_index]  # noqa: E731
        x0 = sample - jnp.asarray(self.sigmas, dtype)[t_index] * model_output.astype(dtype)
        history = jnp.concatenate([x0[None], history[:-1]])
        weighted = lambda w: jnp.tensordot(w, history, axes=1)  # noqa: E731
        corrected = row(self.corr_last) * last + row(self.corr_self) * sample + weighted(
            row(self.corr_m))
        following = row(self.pred_x) * corrected + weighted(row(self.pred_m))
        return following, (corrected, history)


def _unipc_row(sig, target, source, older, order, solver_type, corrector):
    """Coefficients of one UniP (predictor) or UniC (corrector) bh update in x0 form.

    sig: float64 grid; target/source: indices of sigma_t / sigma_s0; older: indices of the
    earlier x0 predictions used (order - 1 of them for UniP, order - 1 for UniC too).
    Returns (coefficient on the source sample, [coef of m_s0, coefs of older...],
    coefficient of the new x0 prediction (UniC only, else 0)).
    """
    alpha_t = 1.0 - sig[target]
    if sig[target] == 0.0:  # the last step: x_next is the x0 prediction (order 1 only)
        if order != 1 or corrector:
            raise ValueError("a UniPC step to sigma 0 must be a first-order prediction")
        return 0.0, np.array([1.0]), 0.0
    lam = lambda j: np.log(1.0 - sig[j]) - np.log(sig[j])  # noqa: E731  log-SNR, alpha = 1 - sigma
    h = lam(target) - lam(source)
    rks = np.array([(lam(j) - lam(source)) / h for j in older] + [1.0])
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh) if solver_type == "bh2" else hh
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1.0
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    b = np.array(b)
    r = np.vander(rks, order, increasing=True).T  # r[i, k] = rks[k] ** i
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r, b)
        own, rhos = rhos[-1], rhos[:-1]
    else:
        rhos = {1: np.zeros(0), 2: np.array([0.5])}.get(order)
        rhos = np.linalg.solve(r[:-1, :-1], b[:-1]) if rhos is None else rhos
        own = 0.0
    ratio = rhos / rks[:-1]
    m_source = -alpha_t * h_phi_1 + alpha_t * b_h * (ratio.sum() + own)
    return sig[target] / sig[source], np.concatenate([[m_source], -alpha_t * b_h * ratio]), (
        -alpha_t * b_h * own)


def unipc_tables(sigmas: np.ndarray, order: int, solver_type: str = "bh2") -> dict:
    """The UniPCScheduler tables for a grid (float64; see the class docstring)."""
    sig = np.asarray(sigmas, np.float64)
    n = len(sig) - 1
    slots = order + 1
    t = {k: np.zeros(n) for k in ("corr_last", "corr_self", "pred_x")}
    t["corr_m"], t["pred_m"] = np.zeros((n, slots)), np.zeros((n, slots))
    step_order = [min(order, n - i, i + 1) for i in range(n)]
    for i in range(n):
        p = step_order[i]
        a, m, _ = _unipc_row(sig, i + 1, i, [i - k for k in range(1, p)], p, solver_type, False)
        t["pred_x"][i], t["pred_m"][i, :len(m)] = a, m
        if i == 0:
            t["corr_self"][i] = 1.0
            continue
        q = step_order[i - 1]  # the corrector has the order of the previous predictor
        a, m, new = _unipc_row(sig, i, i - 1, [i - 1 - k for k in range(1, q)], q, solver_type,
                               True)
        t["corr_last"][i] = a
        t["corr_m"][i, 0] = new
        t["corr_m"][i, 1:1 + len(m)] = m
    return t


@functools.lru_cache(maxsize=32)
def make_scheduler(name: str, *, num_steps: int, shift: float, order: int = 2,
                   grid: str = "diffusers", solver_type: str = "bh2") -> FlowScheduler:
    """A scheduler by name: "euler" (HoloCine) or "unipc" (order 1-3, grid diffusers | wan).

    Cached: equal arguments give the same (immutable) scheduler, so jitted loops are reused.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be a positive integer")
    if not shift > 0:
        raise ValueError(f"shift={shift} must be positive")
    if name == "euler":
        return EulerScheduler("euler", *flow_grid("euler", int(num_steps), float(shift)))
    if name != "unipc":
        raise ValueError(f"unknown scheduler {name!r}; expected one of {SCHEDULERS}")
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order={order} must be 1, 2 or 3")
    if grid not in UNIPC_GRIDS:
        raise ValueError(f"UniPC grid={grid!r} must be one of {UNIPC_GRIDS}")
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"UniPC solver_type={solver_type!r} must be 'bh1' or 'bh2'")
    sigmas, timesteps = flow_grid(grid, int(num_steps), float(shift))
    tables = unipc_tables(sigmas, order, solver_type)
    return UniPCScheduler("unipc", sigmas, timesteps, order, **tables)
