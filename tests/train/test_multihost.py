"""Multi-host training for real (issue 21): two CPU processes with 4 fake devices each join one
job through jax.distributed on 127.0.0.1; the mesh (fsdp 8) spans both. Each process reads its
own slice of the dataset (disjoint, together the epoch), one checkpoint is written (config.json
once, every host's data position in it), and the loss curve and the trained parameters equal the
single-process 8-device run fed the same global batches (multihost_worker.py)."""
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from holocine_jax.data.dataset import write_synthetic_dataset
from holocine_jax.data.encode import encode_dataset
from holocine_jax.parallel import make_mesh
from holocine_jax.train.checkpointing import TrainCheckpointer
from holocine_jax.train.loop import abstract_train_state
from holocine_jax.train.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from multihost_worker import STEPS, train, worker_config  # noqa: E402

NUM_FILMS = 8
# The same programs on the same 8-device mesh; the cross-process all-reduces (gloo) may sum in
# another order than the in-process ones: measured 0 on this host, f32 reduction noise allowed.
LOSS_RTOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root, name, data, workdir, process_id, port):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")]))
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), "multi", data, workdir,
                             process_id, "2", port],
                            stdout=open(root / f"{name}.out", "w"),
                            stderr=open(root / f"{name}.err", "w"), env=env)


def finish(root, procs, timeout=400):
    for name, proc in procs.items():
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise AssertionError(f"{name} did not finish in {timeout}s: "
                                 + (root / f"{name}.err").read_text()[-3000:])
        assert rc == 0, f"{name} exited {rc}: " + (root / f"{name}.err").read_text()[-3000:]
    return {name: (root / f"{name}.out").read_text() for name in procs}


def indices(out: str) -> dict[int, list[list[int]]]:
    """{process: [record indices of each batch it drew]} from a worker's output."""
    seen: dict = {}
    for p, idx in re.findall(r"^indices (\d+) (\[.*\])$", out, re.M):
        seen.setdefault(int(p), []).append(json.loads(idx))
    return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    data = str(root / "data")
    config = worker_config()
    write_synthetic_dataset(data, NUM_FILMS, seed=4, config=config)
    encode_dataset(data, config, progress=False)
    port = free_port()
    procs = {f"host{i}": launch(root, f"host{i}", data, str(root / "multi"), str(i), str(port))
             for i in range(2)}
    # the reference run in this process (8 fake devices, conftest) while the two hosts train
    with contextlib.redirect_stdout(io.StringIO()) as single:
        summary = train(data, str(root / "single"), hosts=2)
    out = finish(root, procs)
    out["single"] = single.getvalue() + f"done {summary['start_step']} {summary['step']}"
    return root, out


def restore(ckpt_dir, step):
    """(TrainState, data state) on this process's 8-device mesh (one process, not two)."""
    config = worker_config()
    with TrainCheckpointer(ckpt_dir, config) as ckpt:
        return ckpt.restore(abstract_train_state(config, make_mesh(config.mesh))[2], step)


def test_both_processes_finish_and_read_disjoint_slices_covering_each_epoch(runs):
    root, out = runs
    for name in out:
        assert out[name].strip().endswith(f"done 0 {STEPS}"), out[name]
    host = {p: indices(out[f"host{p}"])[p] for p in range(2)}
    for step in range(STEPS):   # 4 films per host per step: every step is one epoch of 8
        a, b = host[0][step], host[1][step]
        assert not set(a) & set(b) and sorted(a + b) == list(range(NUM_FILMS)), (step, a, b)
    # the reference run drew exactly those batches, host 0's first
    assert indices(out["single"]) == host


def test_loss_curve_and_parameters_equal_the_single_process_run(runs):
    root, _ = runs
    multi, single = (read_metrics(str(root / d / "metrics.jsonl")) for d in ("multi", "single"))
    assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
    a = np.array([multi[s]["train/loss"] for s in range(1, STEPS + 1)])
    b = np.array([single[s]["train/loss"] for s in range(1, STEPS + 1)])
    assert np.all(np.abs(a - b) <= LOSS_RTOL * np.abs(b)), (a, b)
    assert len(set(a.tolist())) == STEPS   # the steps trained (the loss moved)
    (sa, da), (sb, _) = (restore(str(root / d / "checkpoints"), STEPS) for d in ("multi", "single"))
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        # Adam divides by sqrt(v) + eps: entries with tiny gradients amplify f32 reduction-order
        # noise (test_sharded_step.py), so parameters get an absolute bound of 1e-5, a thousandth
        # of one Adam step at lr 1e-2 (measured: 1.9e-6 on 4 of 65,536 entries, the rest 1e-6)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    assert da == {}   # restored by 1 process: 2 hosts' slices do not apply, the data starts over


def test_one_checkpoint_written_once_with_every_hosts_data_position(runs):
    root, _ = runs
    ckpt = root / "multi" / "checkpoints"
    assert sorted(os.listdir(ckpt)) == sorted(["config.json", str(STEPS)])
    assert not [n for n in os.listdir(ckpt / str(STEPS)) if "tmp" in n]
    assert {"_CHECKPOINT_METADATA", "params", "train", "data"} <= set(os.listdir(ckpt / str(STEPS)))
    data = json.loads((ckpt / str(STEPS) / "data" / "metadata").read_text()) \
        if (ckpt / str(STEPS) / "data" / "metadata").exists() else None
    hosts = (data or {}).get("hosts")
    assert hosts is not None and len(hosts) == 2, data
    # each host's own position in its own slice (3 batches of 4)
    assert all(h["pipes"][0]["grain"] for h in hosts)
