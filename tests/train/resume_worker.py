"""Child process of test_resume.py: train the tiny model in WORKDIR up to STEPS steps.

    python resume_worker.py WORKDIR STEPS [CONFIG_OVERRIDE ...]   (e.g. train.lora.rank=4)

Prints `batch i` (flushed) as batch i is drawn, so the parent can kill -9 it at chosen steps.
"""
import sys

import numpy as np

from holocine_jax.config import load_config
from holocine_jax.shots import ShotLayout
from holocine_jax.train.loop import run_training

OVERRIDES = ["model.num_layers=1", "video.num_frames=17", "attention.impl=reference",
             "train.learning_rate=0.01", "train.warmup_steps=2", "train.ema_decay=0.9",
             "train.log_every=1", "train.checkpoint_every=3", "train.keep_checkpoints=2",
             # random text states of their own shape: no empty prompt to drop to (test_validation)
             "train.caption_dropout=0.0", "train.validate_every=0"]


def worker_config(*more):
    return load_config("tiny", [f"--config.{o}" for o in OVERRIDES + list(more)])


class NumberedBatches:
    """Batch i depends on i alone; the iterator state is the position."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        print(f"batch {self.position}", flush=True)
        rng = np.random.default_rng(self.position)
        cuts = sorted(rng.choice(np.arange(1, 5), size=2, replace=False).tolist())
        layout = ShotLayout.stack([ShotLayout.from_latent_cuts(5, c, latent_hw=(4, 4), max_shots=4)
                                   for c in (cuts, cuts[:1])])
        self.position += 1
        return dict(latents=rng.standard_normal((2, 5, 8, 8, 16)).astype(np.float32),
                    text_states=rng.standard_normal((2, 64, 32)).astype(np.float32), layout=layout)

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])

    def skip_counts(self):
        return {"unreadable": 1}


if __name__ == "__main__":
    summary = run_training(worker_config(*sys.argv[3:]), sys.argv[1], batches=NumberedBatches(),
                           steps=int(sys.argv[2]))
    print(f"done {summary['start_step']} {summary['step']}", flush=True)
