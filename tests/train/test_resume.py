"""Exact resume: a run killed with SIGKILL at random steps (once while an async checkpoint is
being written) and resumed each time ends bit-identical to an uninterrupted run — params,
optimizer, EMA, rng, data position and the per-step loss curve. Plus: params-only loading from a
training checkpoint, init from imported weights, refusing another config's workdir."""
import filecmp
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from holocine_jax.checkpoint import load_config_json, load_params, save_params
from holocine_jax.model import WanDiT
from holocine_jax.train.checkpointing import TrainCheckpointer
from holocine_jax.train.loop import initial_model, run_training
from holocine_jax.train.metrics import read_metrics
from holocine_jax.train.state import init_train_state, split_model

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from resume_worker import worker_config  # noqa: E402

# the whole module under `slow` (test budget): the default run kills and resumes the same worker
# on gs:// (tests/test_gcs.py), and refuses another config in tests/train/test_cross_mesh.py
pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 3


def launch(workdir, cache, *overrides):
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")]))
    log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.stderr"), "a")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "resume_worker.py"), workdir, str(STEPS), *overrides],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)


def run_to_end(workdir, cache, *overrides):
    proc = launch(workdir, cache, *overrides)
    out = proc.stdout.read()
    assert proc.wait() == 0, open(f"{workdir}.stderr").read()[-3000:]
    return out


def run_and_kill(workdir, cache, at_batch, delay, *overrides):
    """Start (or resume) the run and SIGKILL it `delay` s after it draws batch `at_batch`."""
    proc = launch(workdir, cache, *overrides)
    for line in proc.stdout:
        if line.strip() == f"batch {at_batch}":
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
    raise AssertionError(f"the run finished without drawing batch {at_batch}: "
                         + open(f"{workdir}.stderr").read()[-3000:])


def complete_steps(ckpt_dir):
    """Steps whose directories look complete; asserts each really holds every item."""
    steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    for s in steps:
        names = set(os.listdir(os.path.join(ckpt_dir, str(s))))
        assert {"_CHECKPOINT_METADATA", "params", "train", "data"} <= names, (s, names)
    return steps


def restore(ckpt_dir, step):
    config = worker_config()
    graphdef, params, _, _ = split_model(nnx.eval_shape(lambda: WanDiT.from_config(config, rngs=nnx.Rngs(0))))
    with TrainCheckpointer(ckpt_dir, config) as ckpt:
        return ckpt.restore(jax.eval_shape(lambda p: init_train_state(config, p), params), step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cache = str(root / "jax_cache")
    straight, killed = str(root / "straight"), str(root / "killed")
    reference = launch(straight, cache)   # runs beside the first killed run (2 cores)
    rng = random.Random(0)
    kills = []
    # kill 1: mid-step; kill 2: right after the save of a checkpoint step started (async write in
    # flight). Each resumes from the latest complete checkpoint.
    for plan in ("step", "save"):
        latest = max(complete_steps(os.path.join(killed, "checkpoints")), default=0) \
            if os.path.isdir(os.path.join(killed, "checkpoints")) else 0
        if plan == "save":
            at, delay = (latest // EVERY + 1) * EVERY, 0.0
        else:
            at, delay = rng.randrange(latest + 1, min(latest + EVERY + 2, STEPS)), rng.uniform(0, 0.05)
        run_and_kill(killed, cache, at, delay)
        ckpt_dir = os.path.join(killed, "checkpoints")
        tmp = [n for n in os.listdir(ckpt_dir) if "tmp" in n]
        kills.append(dict(at=at, plan=plan, complete=complete_steps(ckpt_dir), in_flight=tmp))
    assert reference.wait() == 0, open(f"{straight}.stderr").read()[-3000:]
    out = run_to_end(killed, cache)
    return straight, killed, kills, out


def test_kill_and_resume_is_bit_identical(runs):
    straight, killed, kills, out = runs
    assert out.strip().endswith(f"{STEPS}"), out
    save_kill = [k for k in kills if k["plan"] == "save"][0]
    # the kill landed while the save of step `at` was being written: not complete, a tmp dir left
    assert save_kill["at"] not in save_kill["complete"] and save_kill["in_flight"], kills
    a, b = restore(os.path.join(straight, "checkpoints"), STEPS), restore(os.path.join(killed, "checkpoints"), STEPS)
    assert a[1] == b[1] == {"position": STEPS}
    leaves_a, leaves_b = jax.tree.leaves(a[0]), jax.tree.leaves(b[0])
    assert len(leaves_a) == len(leaves_b) and int(a[0].step) == STEPS
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    curve_a, curve_b = (read_metrics(os.path.join(d, "metrics.jsonl")) for d in (straight, killed))
    assert sorted(curve_a) == list(range(1, STEPS + 1))
    assert [curve_a[s]["train/loss"] for s in range(1, STEPS + 1)] == \
        [curve_b[s]["train/loss"] for s in range(1, STEPS + 1)]
    assert curve_b[STEPS]["data/skipped/unreadable"] == 1.0 and "train/grad_norm" in curve_b[STEPS]
    # keep_checkpoints=2, no temporary directories left behind
    assert complete_steps(os.path.join(killed, "checkpoints")) == [STEPS - EVERY, STEPS]
    assert not [n for n in os.listdir(os.path.join(killed, "checkpoints")) if "tmp" in n]


def test_params_only_loading_and_init_from_imported_weights(runs, tmp_path):
    straight = runs[0]
    state, _ = restore(os.path.join(straight, "checkpoints"), STEPS)
    model = load_params(os.path.join(straight, "checkpoints"))   # what sample / export call
    for x, y in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(state.params)):
        assert np.array_equal(x, y)
    save_params(model, str(tmp_path / "imported"), load_config_json(os.path.join(straight, "checkpoints")))
    start = initial_model(worker_config(f"train.init_from={tmp_path / 'imported'}"))
    for x, y in zip(jax.tree.leaves(nnx.state(start, nnx.Param)), jax.tree.leaves(state.params)):
        assert np.array_equal(x, y)
    with pytest.raises(ValueError, match=r"config.model.ffn_dim: \d+ there, 256 here"):
        initial_model(worker_config(f"train.init_from={tmp_path / 'imported'}", "model.ffn_dim=256"))


def test_resume_with_another_model_config_is_refused_and_writes_nothing(runs):
    straight = runs[0]
    ckpt_dir = os.path.join(straight, "checkpoints")
    before = {n: os.path.getmtime(os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir)}
    config_copy = open(os.path.join(ckpt_dir, "config.json")).read()
    with pytest.raises(ValueError, match=r"another config \(config.model.num_layers: 1 stored, 2 now\)"):
        run_training(worker_config("model.num_layers=2"), straight, batches=iter([]), steps=STEPS + 3)
    assert {n: os.path.getmtime(os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir)} == before
    assert open(os.path.join(ckpt_dir, "config.json")).read() == config_copy
