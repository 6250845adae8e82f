"""Child process of test_multihost.py: one process of a 2-process CPU training job, or the
single-process reference run.

    python multihost_worker.py multi  DATA_DIR WORKDIR PROCESS_ID NUM_PROCESSES PORT
    python multihost_worker.py single DATA_DIR WORKDIR

multi: 4 fake CPU devices per process; the processes join one job through the CLI's
`initialize_distributed` (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), the
mesh (fsdp = all 8 devices) spans both, and each reads its slice of the cached dataset through
`make_pipeline`'s default host sharding (jax.process_index / process_count).
single: 8 fake devices in one process, fed what the two hosts feed together: host 0's batch then
host 1's (the global batch `make_array_from_process_local_data` assembles, in device order).

Prints `indices P [...]` for every batch process P draws and `done START STEP` at the end.
"""
import os
import sys

import jax
import numpy as np

from holocine_jax.parallel import initialize_distributed
from holocine_jax.config import load_config
from holocine_jax.data.pipeline import make_pipeline
from holocine_jax.train.loop import run_training

STEPS, HOST_BATCH = 3, 4   # 8 films: one epoch per step (4 per host)
OVERRIDES = ["model.num_layers=1", "video.num_frames=17", "attention.impl=reference",
             "train.learning_rate=0.01", "train.warmup_steps=1", "train.ema_decay=0.9",
             "train.log_every=1", f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}", f"train.batch_size={HOST_BATCH}",
             "train.caption_dropout=0.0", "train.validate_every=0", "mesh.fsdp=-1"]


def worker_config():
    return load_config("tiny", [f"--config.{o}" for o in OVERRIDES])


class Printed:
    """A pipeline that prints the record indices of every batch it gives."""

    def __init__(self, pipes):
        self.pipes = pipes

    def __next__(self):
        batches = [next(p) for p in self.pipes]
        for host, b in enumerate(batches):
            print(f"indices {jax.process_index() + host} {[int(i) for i in b['index']]}", flush=True)
        return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)

    def get_state(self):
        return {"pipes": [p.get_state() for p in self.pipes]}

    def set_state(self, state):
        for p, s in zip(self.pipes, state["pipes"]):
            p.set_state(s)


def train(data_dir: str, workdir: str, hosts: int) -> dict:
    """hosts 1: this process is one host of the job (its slice by jax.process_index); hosts 2:
    one process fed both hosts' slices (the reference run)."""
    config = worker_config()
    kwargs = dict(batch_size=HOST_BATCH, seed=config.data.shuffle_seed, cached=True)
    if hosts == 1:
        pipes = [make_pipeline(data_dir, config, **kwargs)]
    else:
        pipes = [make_pipeline(data_dir, config, shard_index=i, shard_count=hosts, **kwargs)
                 for i in range(hosts)]
    return run_training(config, workdir, batches=Printed(pipes))


if __name__ == "__main__":
    mode, data_dir, workdir = sys.argv[1:4]
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={4 if mode == 'multi' else 8}"
                               " --xla_backend_optimization_level=0")
    if mode == "multi":
        os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{sys.argv[6]}",
                          JAX_PROCESS_ID=sys.argv[4], JAX_NUM_PROCESSES=sys.argv[5])
    distributed = initialize_distributed()   # before any other jax use, as the CLI does
    assert distributed == (mode == "multi") and jax.device_count() == 8, jax.devices()
    summary = train(data_dir, workdir, hosts=1 if mode == "multi" else 2)
    print(f"done {summary['start_step']} {summary['step']}", flush=True)
