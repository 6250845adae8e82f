"""Training checkpoints: one orbax CheckpointManager directory per run (DESIGN §10).

Layout (a superset of holocine_jax/checkpoint.py's params checkpoints, so `load_params`,
`export` and `sample` read a training directory as they read an imported one):
    config.json                      the run's config (written with the first save; checked on resume)
    <step>/params                    nnx.State of the trained parameters (a LoRA run: the adapters;
                                     its base is the config's train.init_from or seed)
    <step>/train                     opt_state, ema, step, rng, skipped
    <step>/data                      the data iterator's JSON state (`get_state()`); a multi-host
                                     run stores every host's, {"hosts": [state of process 0, ...]}
Saves are async and atomic (orbax writes a temporary directory and renames it when complete;
unfinished ones are removed when the manager opens), the latest `keep` steps are kept.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from holocine_jax import files
from holocine_jax.checkpoint import load_config_json
from holocine_jax.train.state import TrainState

log = logging.getLogger(__name__)

ITEMS = ("params", "train", "data")
# Model keys that only change how the step computes; every other model key (and `expert`)
# fixes the saved state's shapes, so a resume must not change it.
FREE_MODEL_KEYS = ("dtype", "remat", "scan_layers")


def _shape_keys(config) -> dict:
    """{'model.dim': 64, ..., 'expert': 'high'} from a config (or its stored JSON)."""
    d = json.loads(config.to_json_best_effort())
    flat = {f"model.{k}": v for k, v in d.get("model", {}).items() if k not in FREE_MODEL_KEYS}
    flat["expert"] = d.get("expert")
    lora = (d.get("train") or {}).get("lora") or {}
    flat["train.lora"] = lora if lora.get("rank") else None   # adapters' shapes (rank 0: none)
    return flat


class TrainCheckpointer:
    """Save / restore TrainState + data iterator state under `directory`.

    Opening a directory that holds a checkpoint of another model config raises before anything
    is written. config.json is written with the first save, so a run that fails before it (a
    bad `init_from`, a compile error) leaves no config behind to refuse the corrected rerun.
    """

    def __init__(self, directory: str, config, *, keep: int = 3, async_save: bool = True):
        self.directory = files.resolve(directory)   # local or gs:// (orbax writes either)
        files.makedirs(self.directory)
        self._config_path = os.path.join(self.directory, "config.json")
        self._config_json = None
        if files.exists(self._config_path):
            stored, current = _shape_keys(load_config_json(self.directory)), _shape_keys(config)
            changed = [f"config.{k}: {stored.get(k)!r} stored, {current.get(k)!r} now"
                       for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
            if changed:
                raise ValueError(f"{self.directory!r} holds a checkpoint of another config "
                                 f"({'; '.join(changed)}); use a new workdir or the stored config")
        else:
            self._config_json = config.to_json_best_effort(indent=2)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Start saving `state` at its step (async); returns whether a save was started."""
        if self._config_json is not None:
            if jax.process_index() == 0:   # one writer on a multi-host run (a shared directory)
                files.write_text(self._config_path, self._config_json)
            self._config_json = None
        return self.manager.save(int(state.step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(_train_item(state)),
            data=ocp.args.JsonSave(_all_hosts(data_state or {}))), force=force)

    def restore(self, abstract: TrainState, step: int | None = None, *, frozen=None):
        """(TrainState, data_state) from `step` (default: the latest complete one) into the
        `abstract` target (from jax.eval_shape), or None when the directory has no step.
        `frozen`: the state's untrained parameters (a LoRA run's base), which are not saved."""
        if frozen is None and len(jax.tree.leaves(abstract.frozen)):
            raise ValueError("this train state has frozen parameters (a LoRA base): pass them")
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                train=ocp.args.StandardRestore(_train_item(abstract)),
                data=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"checkpoint step {step} in {self.directory!r} does not match this "
                             f"config's train state: {e}") from e
        t = out.train
        data_state = _this_host(dict(out.data or {}), f"checkpoint step {step} in {self.directory!r}")
        state = TrainState(params=out.params, frozen=frozen if frozen is not None else abstract.frozen,
                           opt_state=t["opt_state"], ema=t.get("ema"),
                           step=t["step"], rng=t["rng"], skipped=t["skipped"])
        return state, data_state

    def wait_until_finished(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _train_item(state: TrainState) -> dict:
    item = dict(opt_state=state.opt_state, step=state.step, rng=state.rng, skipped=state.skipped)
    if state.ema is not None:
        item["ema"] = state.ema
    return item


def _all_hosts(data_state: dict) -> dict:
    """This host's data iterator state -> the item to save: itself on one host; on several,
    {"hosts": [every host's state]} (orbax writes JSON items from the primary host alone, and
    each host's iterator is at its own position in its own slice of the data)."""
    if jax.process_count() == 1:
        return data_state
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return {"hosts": [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]}


def _this_host(saved: dict, where: str) -> dict:
    """This host's data iterator state from a saved item (see `_all_hosts`); {} (the data starts
    over, with a warning) when the run had another number of hosts: each host's slice of the
    data changes with the host count, so no saved position applies to it."""
    if "hosts" not in saved:
        hosts = [saved]
    else:
        hosts = list(saved["hosts"])
    if len(hosts) == jax.process_count():
        return dict(hosts[jax.process_index()])
    if not any(hosts):
        return {}
    log.warning("%s: the data position was saved by %d host(s), this run has %d; each host's "
                "slice of the data differs, so the data iterator starts from the beginning "
                "(parameters, optimizer state and step are restored)", where, len(hosts),
                jax.process_count())
    return {}
