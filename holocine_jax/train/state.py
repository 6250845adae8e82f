"""TrainState: everything a training run carries from step to step, as one pytree.

    graphdef, params, rest = split_model(WanDiT.from_config(config, rngs=nnx.Rngs(config.seed)))
    state = init_train_state(config, params)
    abstract = jax.eval_shape(lambda: init_train_state(config, params))   # restore target
    train_step = make_train_step(config, graphdef, rest)      # train/step.py
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from holocine_jax.train.optim import make_optimizer


@struct.dataclass
class TrainState:
    """params: nnx.State of the model's nnx.Param leaves (f32); opt_state: optax state;
    ema: EMA of params (None when config.train.ema_decay == 0); step, skipped: int32 scalars
    (steps run, of which skipped for a non-finite loss); rng: uint32 [2] raw key data."""
    params: nnx.State
    opt_state: object
    ema: object
    step: jax.Array
    rng: jax.Array
    skipped: jax.Array


def split_model(model):
    """(graphdef, params, rest): the static graph, the nnx.Param leaves and any other state."""
    return nnx.split(model, nnx.Param, ...)


def init_train_state(config, params) -> TrainState:
    """The step-0 state for `params` (pure: works under jax.eval_shape for restore targets)."""
    tc = config.train
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ValueError(f"config.train.ema_decay={tc.ema_decay} must be in [0, 1)")
    return TrainState(
        params=params, opt_state=make_optimizer(tc).init(params),
        ema=jax.tree.map(jnp.copy, params) if tc.ema_decay > 0 else None,
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1)),
        skipped=jnp.zeros((), jnp.int32))
