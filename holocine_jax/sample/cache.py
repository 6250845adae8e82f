"""Step caches for sampling (`config.sample.cache`): skip the DiT's block stack on steps whose
input barely changed, reusing the last computed step's residual (blocks' output minus input).

    cache = cache_from_config(config)            # None for "none", else a TeaCache
    forced = cache.forced_steps(experts)         # [N] bool, host side
    memory = cache.init(rows, tokens, dim)       # at step 0 and at each expert's first step
    v, memory = cache.forward(model, memory, forced[i], latents, t, text, layout)

TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model"), with Wan's indicator as HoloCine's pipeline (DiffSynth's TeaCache for Wan) uses it: the
timestep modulation t_mod [R, 6, dim] that modulates every block's input. Per step i:

    d_i = poly(mean|t_mod_i - t_mod_{i-1}| / mean|t_mod_{i-1}|)    (`coefficients`, highest
    A  += d_i                                                       degree first: np.polyval)
    skip = not forced_i and A < threshold
    skip: x_out = x_in + residual;  else: x_out = blocks(x_in), residual = x_out - x_in, A = 0

t_mod_{i-1} is updated on every step, skipped or not. Forced (computed, A = 0): the first
`warmup_steps`, the last step and the first step of each expert, whose memory starts afresh
(`init`): the other expert's residual means nothing to it. The skip is one `lax.cond` around
the block stack, so a skipped step costs the embeddings and the head only.

Granularity: one decision per step for the whole batch (every film, both CFG branches): t_mod
depends only on the timestep, which all rows share, so a per-row rule would decide the same
(and the skip schedule depends on the model and the timestep grid, not on prompts or noise).
The residual is kept per row: each film and each CFG branch reuses its own. Memory: one
float32 [R, L, dim] residual (R = B, or 2B with CFG).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CACHES = ("none", "teacache")


class TeaCacheMemory(NamedTuple):
    """The cache state carried through the sampling loop (one per expert run)."""
    t_mod: jax.Array      # [R, 6, dim] float32: the previous step's modulation
    distance: jax.Array   # [] float32: accumulated rescaled change since the last computed step
    residual: jax.Array   # [R, L, dim] float32: blocks' output - input, last computed step
    skipped: jax.Array    # [] bool: whether the latest step reused the residual


def teacache_decide(distance, previous, current, force, *, threshold, coefficients):
    """One step of the rule (module docstring): (skip [] bool, accumulated distance after it).

    distance: [] accumulated so far; previous, current: the step's indicator before and now
    (t_mod [R, 6, dim]); force: [] bool.
    """
    scale = jnp.maximum(jnp.mean(jnp.abs(previous)), jnp.finfo(jnp.float32).tiny)
    change = jnp.mean(jnp.abs(current - previous)) / scale
    accumulated = distance + jnp.polyval(jnp.asarray(coefficients, jnp.float32), change)
    skip = jnp.logical_and(jnp.logical_not(force), accumulated < threshold)
    return skip, jnp.where(skip, accumulated, 0.0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class TeaCache:
    """The TeaCache rule (static: hashable, part of the jitted step's identity)."""
    threshold: float
    coefficients: tuple[float, ...] = (1.0, 0.0)
    warmup_steps: int = 1

    def forced_steps(self, experts) -> np.ndarray:
        """[N] bool: steps always computed, from the [N] expert index of each step."""
        experts = np.asarray(experts)
        n = len(experts)
        forced = np.arange(n) < self.warmup_steps
        forced[-1] = True
        forced[1:] |= experts[1:] != experts[:-1]
        return forced

    def init(self, rows: int, tokens: int, dim: int) -> TeaCacheMemory:
        """Empty memory for `rows` model rows (B, or 2B with CFG) of `tokens` x `dim`."""
        zeros = jnp.zeros
        return TeaCacheMemory(zeros((rows, 6, dim), jnp.float32), zeros((), jnp.float32),
                              zeros((rows, tokens, dim), jnp.float32), zeros((), bool))

    def forward(self, model, memory: TeaCacheMemory, force, latents, timesteps, text_states,
                layout=None):
        """`model(latents, timesteps, text_states, layout)` with the block stack skipped when
        the rule says so. force: [] bool. Returns (flow prediction [R, F, H, W, C], memory)."""
        e = model.embed(latents, timesteps, text_states, layout)
        skip, distance = teacache_decide(memory.distance, memory.t_mod, e.t_mod, force,
                                         threshold=self.threshold, coefficients=self.coefficients)
        graphdef, params = nnx.split(model)

        def compute(params, x):  # the module is rebuilt inside the branch's trace
            out = nnx.merge(graphdef, params).run_blocks(x, e.context, e.t_mod, e.rope, layout)
            return out, out - x

        def reuse(params, x):
            return x + memory.residual, memory.residual

        x, residual = jax.lax.cond(skip, reuse, compute, params, e.x)
        v = model.head(x, e.temb, model.token_grid(latents.shape))
        return v, TeaCacheMemory(e.t_mod, distance, residual, skip)


def cache_from_config(config) -> TeaCache | None:
    """The cache of `config.sample` (cache, cache_threshold, cache_coefficients,
    cache_warmup_steps); None for "none". Bad values are errors naming the key."""
    s = config.sample
    name = s.get("cache", "none")
    if name not in CACHES:
        raise ValueError(f"config.sample.cache={name!r}; expected one of {CACHES}")
    if name == "none":
        return None
    threshold, warmup = float(s.cache_threshold), s.cache_warmup_steps
    coefficients = tuple(float(c) for c in s.cache_coefficients)
    if not threshold >= 0:
        raise ValueError(f"config.sample.cache_threshold={s.cache_threshold} must be >= 0")
    if not coefficients:
        raise ValueError("config.sample.cache_coefficients must hold at least one number")
    if int(warmup) != warmup or warmup < 1:
        raise ValueError(f"config.sample.cache_warmup_steps={warmup} must be an integer >= 1 "
                         "(the first step has no residual to reuse)")
    return TeaCache(threshold, coefficients, int(warmup))


def cache_settings(config) -> dict:
    """The cache part of a film's metadata (film.json)."""
    cache = cache_from_config(config)
    return dict(cache="none") if cache is None else dict(cache="teacache", **dataclasses.asdict(cache))
