"""Flow-matching objective (DESIGN §10): timestep sampling, per-sample weights, masked loss.

    x_t = (1 - σ) x0 + σ ε,   target v = ε - x0,   t = 1000 σ,   σ = shift(s) = k s / (1 + (k-1) s)

The schedule maths (shift, the 1000-step table) lives in holocine_jax/flow.py. Every mode
draws a *schedule position* p = 1 - s in [p_lo, p_hi) (p = 0 is pure noise):
- "holocine": DiffSynth's FlowMatchScheduler as HoloCine trains it — a 1000-entry table
  σ_i = shift(1 - i/1000), an index i uniform in [min_boundary·1000, max_boundary·1000), and the
  Gaussian-shaped weight table w_i (mean 1) read at i;
- "uniform": p uniform in [p_lo, p_hi), weight 1;
- "logit_normal": s = sigmoid(N(logit_mean, logit_std)) truncated to the same range, weight 1.
A14B experts (`config.expert`) keep the part of the range on their side of `experts.boundary`:
high-noise σ >= boundary, low-noise σ < boundary (index split 417 for shift 5, boundary 0.875).
The weight of a sample depends on its own timestep only, never on the rest of the batch.

Caption dropout (`caption_dropout`) replaces a film's text by the empty prompt's encoding and
drops its text windows, so one model learns the unconditional branch classifier-free guidance
subtracts (DESIGN §10).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

from holocine_jax.flow import NUM_TRAIN_TIMESTEPS, holocine_tables, shift_sigma, unshift_sigma

TIMESTEP_MODES = ("holocine", "uniform", "logit_normal")


@dataclasses.dataclass(frozen=True)
class TimestepSampler:
    """`sampler(key, batch) -> (sigmas [B], timesteps [B] in 0..1000, weights [B])`, jittable."""
    mode: str
    shift: float
    p_lo: float   # schedule positions p = 1 - s in [p_lo, p_hi)
    p_hi: float
    logit_mean: float = 0.0
    logit_std: float = 1.0

    @property
    def index_range(self) -> tuple[int, int]:
        """holocine: the half-open index range [lo, hi) of the 1000-step table."""
        return tuple(math.floor(p * NUM_TRAIN_TIMESTEPS + 1e-6) for p in (self.p_lo, self.p_hi))

    def __call__(self, key, batch: int):
        if self.mode == "holocine":
            sigmas, timesteps, weights = (jnp.asarray(x, jnp.float32) for x in holocine_tables(self.shift))
            lo, hi = self.index_range
            i = jax.random.randint(key, (batch,), lo, hi)
            return sigmas[i], timesteps[i], weights[i]
        if self.mode == "uniform":
            s = 1.0 - jax.random.uniform(key, (batch,), minval=self.p_lo, maxval=self.p_hi)
        else:  # logit_normal, truncated by inverse-CDF sampling to s in (1 - p_hi, 1 - p_lo]
            z_lo, z_hi = (ndtr((_logit(1.0 - p) - self.logit_mean) / self.logit_std)
                          for p in (self.p_hi, self.p_lo))
            u = jax.random.uniform(key, (batch,), minval=z_lo, maxval=z_hi)
            s = jax.nn.sigmoid(self.logit_mean + self.logit_std * ndtri(u))
        sigmas = shift_sigma(s, self.shift)
        return sigmas, sigmas * NUM_TRAIN_TIMESTEPS, jnp.ones((batch,), jnp.float32)


def _logit(s):
    s = jnp.clip(s, 1e-7, 1 - 1e-7)
    return jnp.log(s) - jnp.log1p(-s)


def make_timestep_sampler(config) -> TimestepSampler:
    """The sampler `config.train` asks for, restricted to `config.expert`'s range (A14B)."""
    tc = config.train
    if tc.timesteps not in TIMESTEP_MODES:
        raise ValueError(f"config.train.timesteps={tc.timesteps!r}; expected one of {TIMESTEP_MODES}")
    if not 0.0 <= tc.min_boundary < tc.max_boundary <= 1.0:
        raise ValueError(f"config.train.min_boundary={tc.min_boundary}, max_boundary="
                         f"{tc.max_boundary} must satisfy 0 <= min < max <= 1")
    p_lo, p_hi = float(tc.min_boundary), float(tc.max_boundary)
    expert = config.get("expert")
    names = tuple(config.experts.names)
    if names:
        if expert not in names:
            raise ValueError(f"config.expert={expert!r}; this config trains one of the experts {names}")
        split = expert_split(config.experts.boundary, tc.shift, discrete=tc.timesteps == "holocine")
        p_lo, p_hi = (p_lo, min(p_hi, split)) if expert == names[0] else (max(p_lo, split), p_hi)
        if p_lo >= p_hi:
            raise ValueError(f"expert {expert!r} (split at position {split}) has no timesteps in "
                             f"config.train.min_boundary..max_boundary = {tc.min_boundary}..{tc.max_boundary}")
    return TimestepSampler(tc.timesteps, float(tc.shift), p_lo, p_hi,
                           float(tc.logit_mean), float(tc.logit_std))


def expert_split(boundary: float, shift: float, *, discrete: bool) -> float:
    """Schedule position p where σ falls below `boundary`: exactly 1 - unshift(boundary), or for
    the discrete holocine table the first index with σ_i < boundary over 1000 (0.417 for
    boundary 0.875, shift 5)."""
    if not discrete:
        return float(1.0 - unshift_sigma(boundary, shift))
    return float(np.sum(holocine_tables(shift)[0] >= boundary)) / NUM_TRAIN_TIMESTEPS


def noised(x0, noise, sigmas):
    """x_t = (1 - σ) x0 + σ ε for x0, noise: [B, ...] and sigmas: [B]."""
    s = sigmas.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1 - s) * x0 + s * noise


def frame_mask(layout, batch: int, num_frames: int):
    """[B, F] 1.0 for latent frames that belong to a real shot (padding shots: 0), from the
    layout; all ones without a layout."""
    if layout is None:
        return jnp.ones((batch, num_frames), jnp.float32)
    layout = layout.broadcast_to_batch(batch)
    real = layout.frame_to_shot() < jnp.asarray(layout.num_shots)[:, None]
    return real.astype(jnp.float32)


def per_sample_loss(pred, x0, noise, mask):
    """Masked mean squared flow error per sample: pred, x0, noise [B, F, H, W, C]; mask [B, F].

    Returns [B] (unweighted): mean over the unmasked frames of (pred - (ε - x0))².
    """
    err = jnp.square(pred.astype(jnp.float32) - (noise - x0).astype(jnp.float32))
    per_frame = jnp.mean(err, axis=(2, 3, 4))
    return jnp.sum(per_frame * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def check_caption_dropout(p) -> float:
    """config.train.caption_dropout as a float; outside [0, 1) is an error naming it."""
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"config.train.caption_dropout={p} must be in [0, 1) (the probability "
                         "that a film trains on the empty prompt)")
    return float(p)


def caption_dropout(key, p: float, text_states, layout, empty_states):
    """Drop each film's caption with probability p: (text_states, layout, dropped [B] bool).

    text_states: [B, Lt, Dt]; empty_states: [Lt, Dt], the empty prompt "" encoded as sampling
    encodes prompts (zero past its one token); layout: batched ShotLayout [B] or None. A dropped
    film gets the empty states and `layout.without_text_windows()` (every shot sees all text),
    i.e. exactly what the sampler's unconditional pass feeds the model when the negative prompt
    is "". Wan-style trainers (DiffSynth-Studio, finetrainers) drop to the empty prompt, not to
    the negative prompt: the negative prompt is a sampling-time choice, the empty one the
    unconditional model itself.
    """
    b = text_states.shape[0]
    if empty_states.shape != text_states.shape[1:]:
        raise ValueError(f"empty-prompt states {empty_states.shape} do not match the batch's text "
                         f"states {text_states.shape[1:]} (config.model.text_len, text_dim)")
    dropped = jax.random.bernoulli(key, p, (b,))
    text = jnp.where(dropped[:, None, None], empty_states.astype(text_states.dtype)[None], text_states)
    if layout is None:
        return text, None, dropped
    unconditional = layout.without_text_windows()

    def pick(a, b_):
        return jnp.where(dropped.reshape((-1,) + (1,) * (jnp.ndim(a) - 1)), a, b_)

    layout = dataclasses.replace(
        layout, text_windows=pick(unconditional.text_windows, layout.text_windows),
        text_pad_start=pick(unconditional.text_pad_start, layout.text_pad_start))
    return text, layout, dropped
