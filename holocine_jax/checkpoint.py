"""Parameter checkpoints (orbax).

Layout of a checkpoint directory: `config.json` (the full config) and an orbax
`CheckpointManager` tree with a `params` item per step. `holocine-jax import` writes step 0;
`export` and `sample` read the latest complete step; training adds its own items beside `params`.
"""
from __future__ import annotations

import json
import os

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from holocine_jax.files import atomic_directory
from holocine_jax.model import WanDiT


def run_config(model: WanDiT, config) -> ml_collections.ConfigDict:
    """The run config to store beside `model`'s weights: `config` with its `model` section
    replaced by the model's own (the architecture these weights have)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = ml_collections.ConfigDict(model.config.to_dict())
    return config


def save_params(model: WanDiT, ckpt_dir: str, config, *, step: int = 0) -> str:
    """Write the run `config` (see `run_config`) and `model`'s parameters as a new checkpoint
    directory (all or nothing)."""
    with atomic_directory(ckpt_dir) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(run_config(model, config).to_json_best_effort(indent=2))
        with ocp.CheckpointManager(os.path.abspath(tmp), item_names=("params",)) as manager:
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(nnx.state(model, nnx.Param))))
            manager.wait_until_finished()
    return ckpt_dir


def load_config_json(ckpt_dir: str) -> ml_collections.ConfigDict:
    """The config stored beside a checkpoint."""
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{ckpt_dir!r} is not a holocine-jax checkpoint: no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_params(ckpt_dir: str, config=None, *, step: int | None = None) -> WanDiT:
    """WanDiT restored from the latest (or given) complete step of a checkpoint directory."""
    config = config if config is not None else load_config_json(ckpt_dir)
    abstract = nnx.eval_shape(lambda: WanDiT.from_config(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    with ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_names=("params",)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint step in {ckpt_dir!r}")
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(params)))
    return nnx.merge(graphdef, restored.params, rest)
