"""`holocine-jax train` (and the demo's training stage): a run config + a built dataset -> a
training run in a workdir.

    summary = train_on_dataset(config, "data_dir", "workdir", tokenizer=tokenizer,
                               text_encoder=encoder, vae=vae)
"""
from __future__ import annotations

import os

from holocine_jax.data.encode import INFO, cache_dir
from holocine_jax.data.pipeline import make_pipeline
from holocine_jax.train.loop import run_training


def train_on_dataset(config, data_dir: str, workdir: str, *, tokenizer, text_encoder, vae,
                     validation_score=None) -> dict:
    """Train (or resume) in `workdir` on the dataset at `data_dir` through the Grain pipeline:
    from its `data encode` cache (latents + text states) when it has a complete one, else from
    its clips (encoded on the fly by `text_encoder` and `vae`). Returns run_training's summary; `validation_score` scores validation films (run_training)."""
    cached = os.path.exists(os.path.join(cache_dir(data_dir), INFO))
    batches = make_pipeline(data_dir, config, batch_size=config.train.batch_size,
                            seed=config.data.shuffle_seed, tokenizer=tokenizer, cached=cached)
    return run_training(config, workdir, batches=batches, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, validation_score=validation_score)
