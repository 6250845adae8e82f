"""Grain pipeline throughput vs a plain Python loop over the same records (issue 7).

    python benchmarks/data_pipeline.py [--films 64] [--batches 24] [--batch 8]
        [--out benchmarks/results/data_pipeline.json]

Writes a synthetic dataset (tiny config: 33 frames of 64x64), then times, after one warm-up
batch, `--batches` batches of: a plain loop (read record, decode, build the example, stack; one
process) and the Grain pipeline with 0, 1 and 2 worker processes, all tokenising the prompt and
building the ShotLayout. films/s counts examples; MB/s the float32 video bytes delivered.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from holocine_jax.config import load_config
from holocine_jax.data.dataset import load_data_source, write_synthetic_dataset
from holocine_jax.data.pipeline import ExampleTransform, _stack, make_pipeline
from holocine_jax.text import world_tokenizer


def plain_loop(data_dir, config, tokenizer, batch, num_batches):
    """The baseline: the same per-record work, sequential, no Grain."""
    source, transform = load_data_source(data_dir), ExampleTransform(config, tokenizer)
    order = np.random.default_rng(0).permutation(len(source))
    i = 0
    for _ in range(num_batches):
        examples = []
        for _ in range(batch):
            index = int(order[i % len(order)])
            examples.append(transform.map((index, source[index])))
            i += 1
        yield _stack(examples)


def timed(batches, num_batches):
    next(batches)  # warm-up: worker start, file handles
    start = time.perf_counter()
    nbytes = sum(next(batches)["video"].nbytes for _ in range(num_batches))
    return time.perf_counter() - start, nbytes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--films", type=int, default=64)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "data_pipeline.json"))
    args = p.parse_args()
    config, tokenizer = load_config("tiny"), world_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        write_synthetic_dataset(data_dir, args.films, seed=0, config=config)
        cases = [("plain loop", lambda: plain_loop(data_dir, config, tokenizer, args.batch,
                                                   args.batches + 1))]
        for workers in (0, 1, 2):
            def grain_batches(workers=workers):
                c = config.copy_and_resolve_references()
                c.data.num_workers = workers
                return make_pipeline(data_dir, c, batch_size=args.batch, seed=0, tokenizer=tokenizer)
            cases.append((f"grain, {workers} workers", grain_batches))
        for name, make in cases:
            seconds, nbytes = timed(iter(make()), args.batches)
            films = args.batches * args.batch
            rows.append(dict(case=name, films=films, seconds=seconds, films_per_s=films / seconds,
                             mb_per_s=nbytes / seconds / 2**20))
    base = rows[0]["films_per_s"]
    print(f"{'case':18} {'films/s':>8} {'MB/s':>8} {'vs loop':>8}")
    for r in rows:
        r["ratio_vs_plain_loop"] = r["films_per_s"] / base
        print(f"{r['case']:18} {r['films_per_s']:8.1f} {r['mb_per_s']:8.1f} {r['ratio_vs_plain_loop']:8.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, cpus=os.cpu_count(), args=vars(args),
                       rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
