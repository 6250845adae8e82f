"""Parameter checkpoints (orbax).

Layout of a checkpoint directory: `config.json` (the full config) and an orbax
`CheckpointManager` tree with a `params` item per step. `holocine-jax import` writes step 0;
`export` and `sample` read the latest complete step; training adds its own items beside `params`.
A two-expert (A14B) checkpoint holds one expert, named by `expert` in its config.json: import
stores it, export, `init_from`, sample and eval read it (`stored_expert`, `check_experts`).
"""
from __future__ import annotations

import json
import os

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from holocine_jax import files
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
    if not files.exists(path):
        raise FileNotFoundError(f"{ckpt_dir!r} is not a holocine-jax checkpoint: no config.json")
    return ml_collections.ConfigDict(json.loads(files.read_text(path)))


def with_expert(config, expert: str | None) -> ml_collections.ConfigDict:
    """`config` (a copy) set to work on `expert` (`import --expert`): a two-expert (A14B) config
    needs one of `config.experts.names` — no default, since a release root holds both experts and
    a weights folder does not say which one it is; a single-model config takes none."""
    names = tuple(config.experts.names)
    if not names:
        if expert is not None:
            raise ValueError(f"--expert {expert}: config {config.name!r} is a single model "
                             "(config.experts.names is empty); experts belong to two-expert "
                             "configs such as wan22_t2v_a14b")
        return config
    if expert not in names:
        raise ValueError(f"config {config.name!r} has the experts {names}: say which one with "
                         f"--expert {'|'.join(names)}" + (f" (got {expert!r})" if expert else ""))
    config = ml_collections.ConfigDict(config.to_dict())
    config.expert = expert
    return config


def stored_expert(ckpt_dir: str, asked: str | None = None) -> str | None:
    """The expert a checkpoint's config.json records (None: a single-model checkpoint). `asked`
    (a user's --expert) must agree with it: the weights are that expert's whatever a flag says."""
    config = load_config_json(ckpt_dir)
    names = tuple(config.experts.names) if "experts" in config else ()
    if not names:
        if asked is not None:
            raise ValueError(f"--expert {asked}: {ckpt_dir!r} holds a single model "
                             f"(config {config.get('name')!r} has no experts)")
        return None
    expert = config.get("expert")
    if expert not in names:
        raise ValueError(f"{ckpt_dir!r}: its config.json records expert={expert!r}, not one of {names}")
    if asked is not None and asked != expert:
        raise ValueError(f"--expert {asked} disagrees with {ckpt_dir!r}, which holds the "
                         f"{expert!r} expert (its config.json)")
    return expert


def checkpoint_dirs(checkpoint) -> list[str]:
    """`--checkpoint` value(s) -> checkpoint directories. A single directory without a config.json
    of its own is a run directory: its sub-directories (or their `checkpoints/`, as `train
    --workdir RUN/high` writes) that hold one, one per expert, in `experts.names` order."""
    paths = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    run = paths[0]
    if len(paths) != 1 or not files.isdir(run) or files.exists(os.path.join(run, "config.json")):
        return paths
    found: dict = {}
    for name in files.listdir(run):
        for d in (os.path.join(run, name), os.path.join(run, name, "checkpoints")):
            if files.isfile(os.path.join(d, "config.json")):
                found.setdefault(stored_expert(d), []).append(d)
                break
    if None in found or not found:  # no expert run: the checkpoint reader says what is wrong
        return paths
    names = tuple(load_config_json(next(iter(found.values()))[0]).experts.names)
    if set(found) != set(names) or any(len(v) > 1 for v in found.values()):
        raise ValueError(f"run directory {run!r} must hold one checkpoint per expert {names}; found "
                         + "; ".join(f"expert {e!r}: {', '.join(v)}" for e, v in found.items()))
    return [found[n][0] for n in names]


def check_experts(config, paths) -> None:
    """Checkpoints to sample with: one (every step on it), or one per `config.experts.names`
    in that order (high-noise first), each holding that expert (its config.json)."""
    names = tuple(config.experts.names) or ("model",)
    if len(paths) not in (1, len(names)):
        raise ValueError(f"{len(paths)} checkpoints for experts {names}")
    if len(paths) > 1:
        stored = [stored_expert(p) for p in paths]
        if stored != list(names):
            raise ValueError(f"expert checkpoints go in the order {', '.join(names)}: "
                             + "; ".join(f"{p!r} holds the {e!r} expert" for p, e in zip(paths, stored)))


def is_lora_run(config) -> bool:
    """Whether `config` (a run config or a stored config.json) trains LoRA adapters."""
    return bool("train" in config and "lora" in config.train and config.train.lora.rank)


def without_lora(config) -> ml_collections.ConfigDict:
    """A copy of `config` without adapters: the base model a LoRA run trains on."""
    config = ml_collections.ConfigDict(config.to_dict())
    if is_lora_run(config):
        config.train.lora.rank = 0
    return config


def lora_start(config):
    """A LoRA run's model before training: its base (train.init_from, or the seed's weights)
    with fresh adapters (A from seed + 1, B zero), as `train.loop.initial_model` starts it."""
    from holocine_jax.model.lora import LoRASpec
    from holocine_jax.model.transformer import with_lora

    base_config = without_lora(config)
    init = base_config.train.init_from
    base = (load_params(init, base_config) if init else
            WanDiT.from_config(base_config, rngs=nnx.Rngs(base_config.seed)))
    return with_lora(base, LoRASpec.from_config(config.train.lora), rngs=nnx.Rngs(config.seed + 1))


def load_params(ckpt_dir: str, config=None, *, step: int | None = None) -> WanDiT:
    """WanDiT restored from the latest (or given) complete step of a checkpoint directory.

    A LoRA run's checkpoint holds the adapters only: the model is its base (the run config's
    train.init_from or seed, as `train.loop.initial_model` builds it) with those adapters, unmerged.
    """
    config = config if config is not None else load_config_json(ckpt_dir)
    abstract = nnx.eval_shape(lambda: WanDiT.from_config(config, rngs=nnx.Rngs(0)))
    if is_lora_run(config):
        abstract = lora_start(config)
        graphdef, params, rest = nnx.split(abstract, nnx.LoRAParam, ...)
    else:
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    with ocp.CheckpointManager(files.resolve(ckpt_dir), item_names=("params",)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint step in {ckpt_dir!r}")
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(params)))
    return nnx.merge(graphdef, restored.params, rest)
