"""TrainState: everything a training run carries from step to step, as one pytree.

    graphdef, params, frozen, rest = split_model(WanDiT.from_config(config, rngs=nnx.Rngs(config.seed)))
    state = init_train_state(config, params, frozen)
    abstract = jax.eval_shape(lambda: init_train_state(config, params, frozen))   # restore target
    train_step = make_train_step(config, graphdef, rest)      # train/step.py

Full fine-tuning trains every nnx.Param (`frozen` is empty); a LoRA model (config.train.lora)
trains its nnx.LoRAParam adapters alone and carries the base weights in `frozen`: no optimizer
state, no EMA, not checkpointed (the run's config names them: train.init_from or the seed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from holocine_jax.train.optim import make_optimizer


@struct.dataclass
class TrainState:
    """params: nnx.State of the trained leaves (f32); frozen: nnx.State of the untrained
    parameters (a LoRA run's base; empty otherwise); opt_state: optax state; ema: EMA of params
    (None when config.train.ema_decay == 0); step, skipped: int32 scalars (steps run, of which
    skipped for a non-finite loss); rng: uint32 [2] raw key data."""
    params: nnx.State
    frozen: nnx.State
    opt_state: object
    ema: object
    step: jax.Array
    rng: jax.Array
    skipped: jax.Array


def split_model(model):
    """(graphdef, params, frozen, rest): the static graph, the trained parameters (the LoRA
    adapters of a model with adapters, else every nnx.Param), the frozen ones and any other state."""
    if model.lora.rank:
        return nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, nnx.State({}), rest


def init_train_state(config, params, frozen=None) -> TrainState:
    """The step-0 state for `params` (+ `frozen`; pure: works under jax.eval_shape)."""
    tc = config.train
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ValueError(f"config.train.ema_decay={tc.ema_decay} must be in [0, 1)")
    return TrainState(
        params=params, frozen=frozen if frozen is not None else nnx.State({}), opt_state=make_optimizer(tc).init(params),
        ema=jax.tree.map(jnp.copy, params) if tc.ema_decay > 0 else None,
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1)),
        skipped=jnp.zeros((), jnp.int32))
