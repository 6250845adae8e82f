"""Sample films: classifier-free guidance, the A14B expert switch, batched layouts (DESIGN §11).

    latents = sample_film(model, config, text_states, negative_states, layout, key)

The loop is a Python loop over one jitted denoising step per expert (model forward, guidance and
scheduler update in a single program; the step index is traced, so each expert compiles once).
A `lax.fori_loop` would not be faster here: a step is one DiT forward of seconds, the host picks
the expert from the static timestep grid (no `lax.cond` keeping both experts in one program), and
the progress bar reports steps as they finish. A step cache (`config.sample.cache`, see
sample/cache.py) runs `cached_denoise_step` instead, carrying its memory from step to step;
"none" runs exactly the uncached program.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from holocine_jax.sample.cache import cache_from_config
from holocine_jax.sample.schedulers import make_scheduler
from holocine_jax.shots import latent_shape


def scheduler_from_config(config):
    """The config's scheduler (`config.sample`: scheduler, num_steps, shift, order, unipc_grid)."""
    s = config.sample
    return make_scheduler(s.scheduler, num_steps=s.num_steps, shift=s.shift,
                          order=s.get("order", 2), grid=s.get("unipc_grid", "diffusers"))


def guidance_scales(config, num_experts: int) -> tuple[float, ...]:
    """Guidance scale per expert: `config.sample.guidance_scale` is one number or one per expert
    (in `config.experts.names` order: high-noise first)."""
    g = config.sample.guidance_scale
    scales = tuple(float(x) for x in g) if isinstance(g, (tuple, list)) else (float(g),) * num_experts
    if len(scales) != num_experts:
        raise ValueError(f"config.sample.guidance_scale={g} gives {len(scales)} scales for "
                         f"{num_experts} expert(s)")
    return scales


def initial_noise(key, shape) -> jax.Array:
    """Gaussian noise [B, ...]: one key per film ([B] keys), or one key split into B."""
    keys = key if jnp.ndim(key) == 1 else jax.random.split(key, shape[0])
    if keys.shape[0] != shape[0]:
        raise ValueError(f"{keys.shape[0]} keys for a batch of {shape[0]} films")
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)


def _concat(a, b):
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


@functools.lru_cache(maxsize=16)
def _jitted_step(graphdef, scheduler, scale: float, cache=None):
    """One compiled program per (model structure, scheduler, guidance scale, cache rule), reused
    by calls: `denoise_step`, or `cached_denoise_step` with a cache (sample/cache.py)."""
    if cache is None:
        return jax.jit(functools.partial(denoise_step, graphdef, scheduler, scale))
    return jax.jit(functools.partial(cached_denoise_step, graphdef, scheduler, scale, cache))


def guided(forward, scale, x, t, text, negative, layout, negative_layout):
    """v = v_neg + scale (v_pos - v_neg) as float32 [B, ...], and forward's second output.

    forward(latents, timesteps, text, layout) -> (flow prediction, aux). Both CFG passes run as
    one batch of 2B (positive rows first); scale 1 runs the positive pass alone.
    """
    if scale == 1.0:
        v, aux = forward(x, t, text, layout)
        return v.astype(jnp.float32), aux
    both, aux = forward(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                        jnp.concatenate([text, negative]), _concat(layout, negative_layout))
    positive, neg = jnp.split(both.astype(jnp.float32), 2)
    return neg + scale * (positive - neg), aux


def denoise_step(graphdef, scheduler, scale, params, state, x, t_index, text, negative, layout,
                 negative_layout):
    """One guided step: v = v_neg + scale (v_pos - v_neg); scale 1 skips the negative pass.

    graphdef, scheduler, scale: static (bind them with functools.partial before jitting);
    params: the model's nnx state; state: the scheduler state; x: [B, F, h, w, z] latents;
    t_index: int32 [] step index into scheduler.timesteps; text, negative: [B, Lt, D] text
    states; layout, negative_layout: ShotLayouts batched [B] (or None: plain Wan). Returns
    (x, state) after the scheduler update. Both CFG passes run as one batch of 2B.
    """
    model = nnx.merge(graphdef, params)
    t = jnp.full((x.shape[0],), jnp.asarray(scheduler.timesteps)[t_index])
    v, _ = guided(lambda *a: (model(*a), None), scale, x, t, text, negative, layout,
                  negative_layout)
    return scheduler.step(state, v, t_index, x)


def cached_denoise_step(graphdef, scheduler, scale, cache, params, state, x, t_index, text,
                        negative, layout, negative_layout, memory, force):
    """`denoise_step` through a step cache: cache (static) is the rule, memory its state for
    this expert's rows (B, or 2B with CFG), force: [] bool (compute the blocks whatever the
    rule says). Returns (x, state, memory)."""
    model = nnx.merge(graphdef, params)
    t = jnp.full((x.shape[0],), jnp.asarray(scheduler.timesteps)[t_index])
    v, memory = guided(lambda *a: cache.forward(model, memory, force, *a), scale, x, t, text,
                       negative, layout, negative_layout)
    x, state = scheduler.step(state, v, t_index, x)
    return x, state, memory


def sample_film(models, config, text_states, negative_states, layout, key, *, scheduler=None,
                progress: bool = True, computed: list | None = None) -> jax.Array:
    """Denoise noise into normalised latents [B, F, h, w, z].

    models: a WanDiT or one per `config.experts.names` (high-noise expert first, used while
    t >= config.experts.boundary * 1000). text_states: [B, Lt, D]; negative_states: [1 or B, Lt,
    D]; layout: ShotLayout (batched [B] or one for all films) with the prompts' text windows, or
    None (plain Wan); the negative prompt uses the same cuts without windows. key: one PRNG key
    or [B] keys. `config.sample.cache` may skip the block stack on some steps (sample/cache.py);
    computed: a list that receives, per step, whether the block stack ran.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    scheduler = scheduler if scheduler is not None else scheduler_from_config(config)
    scales = guidance_scales(config, len(models))
    experts = scheduler.expert_of_step(config.experts.boundary, len(models))
    b = text_states.shape[0]
    if negative_states.shape[0] not in (1, b) or negative_states.shape[1:] != text_states.shape[1:]:
        raise ValueError(f"negative_states {negative_states.shape} do not match text_states "
                         f"{text_states.shape} (batch 1 or {b})")
    negative_states = jnp.broadcast_to(negative_states, text_states.shape)
    if layout is not None:  # None: one shot, no windows (plain Wan)
        layout = layout.broadcast_to_batch(b)
    negative_layout = None if layout is None else layout.without_text_windows()
    x = initial_noise(key, latent_shape(config, b))
    state = scheduler.init_state(x)
    cache = cache_from_config(config)
    forced = None if cache is None else cache.forced_steps(experts)
    steps = {}
    for e, model in enumerate(models):
        graphdef, params = nnx.split(model)
        steps[e] = functools.partial(_jitted_step(graphdef, scheduler, scales[e], cache), params)
    bar = tqdm.trange(scheduler.num_steps, desc="sampling", disable=not progress, leave=False)
    reused = 0
    for i in bar:
        e = int(experts[i])
        args = (state, x, np.int32(i), text_states, negative_states, layout, negative_layout)
        if cache is None:
            x, state = steps[e](*args)
            ran = True
        else:
            if i == 0 or e != experts[i - 1]:  # each expert starts with empty memory
                memory = cache.init(b if scales[e] == 1.0 else 2 * b,
                                    math.prod(models[e].token_grid(x.shape)), models[e].config.dim)
            x, state, memory = steps[e](*args, memory, np.bool_(forced[i]))
            ran = not bool(memory.skipped)
        x.block_until_ready()
        reused += not ran
        if computed is not None:
            computed.append(ran)
        bar.set_postfix(t=f"{scheduler.timesteps[i]:.0f}", expert=e, reused=reused)
    return x
