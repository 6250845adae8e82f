"""Parameter checkpoints (orbax) and all-or-nothing output directories.

Layout of a checkpoint directory: `config.json` (the full config) and an orbax
`CheckpointManager` tree with a `params` item per step. `holocine-jax import` writes step 0;
`export` and `sample` read the latest complete step; training adds its own items beside `params`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from holocine_jax.model import WanDiT


@contextlib.contextmanager
def atomic_directory(out: str):
    """Yield a temporary sibling of `out`; rename it to `out` only if the block succeeds."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"output directory {out!r} exists and is not empty")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_params(model: WanDiT, ckpt_dir: str, *, step: int = 0) -> str:
    """Write `model`'s config and parameters as a new checkpoint directory (all or nothing)."""
    with atomic_directory(ckpt_dir) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(model.config.to_json_best_effort(indent=2))
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
    abstract = nnx.eval_shape(lambda: WanDiT(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    with ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_names=("params",)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint step in {ckpt_dir!r}")
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(params)))
    return nnx.merge(graphdef, restored.params, rest)
