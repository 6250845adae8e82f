"""Grain pipeline throughput with 0, 1 and 2 worker processes, and where the time goes (issue 16).

    python benchmarks/data_pipeline.py [--films 64] [--batches 24] [--big-films 16]
        [--big-batches 12] [--big-size 480x832] [--batch 8]
        [--out benchmarks/results/data_pipeline.json]

Three datasets, all made by the project's build path (synthetic-world films rendered, written as
H.264 mp4 with PyAV, a manifest, `build_dataset`): the tiny config's 33 frames of 64x64 and 33
frames of `--big-size`, both with storage "frames" (decoded, resized uint8 frames in zlib-encoded
ArrayRecord records), and the same big films with storage "mp4" (`<size> mp4`: H.264 records at
crf 18 that the transform decodes with PyAV, in the workers when there are any).
For each, after one warm-up batch, times `--batches` batches of a plain loop (read, transform,
stack; no Grain) and of the pipeline with 0, 1 and 2 workers and with 0 workers and 2 read
threads, all tokenising the prompt and building the ShotLayout; the mp4 data also with FFmpeg's
automatic threads (decode_threads=0, one per core) instead of the default 1. films/s counts
examples; MB/s the uint8 video bytes delivered.

Stages (ms per film, one process, serial): read (the raw ArrayRecord record), decode (frames:
zlib inflate by TFDS; mp4: the H.264 decode + RGB conversion, which the transform does, shown
apart), transform (`ExampleTransform`, less that decode), stack (batching in the main process),
ipc put (frames: a worker copies them into shared memory; mp4: a worker decodes straight into
shared memory, and this is what that costs over private memory), ipc get+stack (the main
process maps them and batches), and to_float32 (what the transform did before the uint8
change); `stored KB` is the stored video per film. `bound 2w`: the best 2-workers / 0-workers
ratio 2 cores allow given these costs (workers spend read + decode + transform + ipc put per
film, the main process ipc get+stack).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from grain.multiprocessing import SharedMemoryArray

from holocine_jax.config import load_config
from holocine_jax.data.dataset import (build_dataset, clip_frames, dataset_dir, dataset_storage,
                                       load_data_source, write_synthetic_dataset)
from holocine_jax.data.pipeline import ExampleTransform, _stack, make_pipeline
from holocine_jax.text import world_tokenizer


def say(msg: str) -> None:
    print(f"data_pipeline: {msg}", file=sys.stderr, flush=True)


def plain_loop(data_dir, config, tokenizer, batch, num_batches):
    """The baseline: the same per-record work, sequential, no Grain."""
    source = load_data_source(data_dir)
    transform = ExampleTransform(config, tokenizer, storage=dataset_storage(data_dir))
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
    """(seconds, video bytes) of `num_batches` batches after one warm-up batch."""
    next(batches)  # warm-up: worker start, file handles
    start = time.perf_counter()
    nbytes = sum(next(batches)["video"].nbytes for _ in range(num_batches))
    return time.perf_counter() - start, nbytes


def per_film(fn, items, films: int | None = None) -> tuple[float, list]:
    """(ms per film, results) of fn over items (`films` in all; default one per item)."""
    start = time.perf_counter()
    out = [fn(x) for x in items]
    return (time.perf_counter() - start) / (films or len(items)) * 1e3, out


def stages(data_dir, config, tokenizer, batch) -> dict:
    """(ms per film of each stage (module docstring), stored KB per film), over every record."""
    builder = tfds.builder_from_directory(dataset_dir(data_dir))
    raw = builder.as_data_source("train", decoders={"video": tfds.decode.SkipDecoding()})
    storage = dataset_storage(data_dir)
    full = load_data_source(data_dir)
    transform = ExampleTransform(config, tokenizer)  # on decoded frames (mp4: decoded below)
    n = len(full)
    groups = lambda xs: [xs[i:i + batch] for i in range(0, n, batch)]  # noqa: E731
    ms = dict.fromkeys(["read", "decode", "transform"])
    ms["read"], stored = per_film(lambda i: raw[i], range(n))
    read_decode, records = per_film(lambda i: full[i], range(n))
    ms["decode"], h264, into_shm = read_decode - ms["read"], 0.0, 0.0
    if storage == "mp4":  # what the transform does first; a worker's into shared memory
        def shared(shape, dtype):
            buffer = SharedMemoryArray(shape, dtype)
            buffer.unlink_on_del()
            return buffer
        clip_frames(records[0]["video"], "mp4")  # warm-up: the first decode opens the codec
        into_shm, _ = per_film(lambda r: clip_frames(r["video"], "mp4", alloc=shared).shape,
                               records)
        h264, frames = per_film(lambda r: clip_frames(r["video"], "mp4"), records)
        ms["decode"] += h264
        records = [dict(r, video=v) for r, v in zip(records, frames)]
    ms["transform"], examples = per_film(lambda i: transform.map((i, records[i])), range(n))
    ms["stack"], _ = per_film(_stack, groups(examples), n)

    def put(example):  # what a worker does with the frames (grain copy_to_shm)
        shm = SharedMemoryArray(example["video"].shape, np.uint8)
        np.copyto(shm, example["video"], casting="no")
        return dict(example, video=shm.metadata)

    def get_stack(group):  # what the main process does (grain open_from_shm, then batching)
        opened = []
        for e in group:
            video = SharedMemoryArray.from_metadata(e["video"])
            video.unlink_on_del()
            opened.append(dict(e, video=video))
        return _stack(opened)

    ms["ipc put"], shipped = per_film(put, examples)
    if storage == "mp4":  # no copy: the cost of decoding into shared instead of private memory
        ms["ipc put"] = into_shm - h264
    ms["ipc get+stack"], _ = per_film(get_stack, groups(shipped), n)
    ms["to_float32"], _ = per_film(lambda e: e["video"].astype(np.float32) / 127.5 - 1.0, examples)
    nbytes = [len(r["video"]["value"] if storage == "frames" else r["video"]) for r in stored]
    return ms, sum(nbytes) / n / 1024  # frames: {"shape", "value": zlib bytes}; mp4: the bytes


def bound_2_workers(ms: dict) -> float:
    """The best 2-workers / 0-workers films/s ratio on 2 cores given the stage costs."""
    zero = ms["read"] + ms["decode"] + ms["transform"] + ms["stack"]
    worker = ms["read"] + ms["decode"] + ms["transform"] + ms["ipc put"]
    return zero * min(2.0 / (worker + ms["ipc get+stack"]), 1.0 / ms["ipc get+stack"])


def run_dataset(label, data_dir, config, tokenizer, batch, num_batches) -> tuple[list, dict, float]:
    cases = [("plain loop", lambda: plain_loop(data_dir, config, tokenizer, batch, num_batches + 1))]
    runs = [dict(num_workers=w) for w in (0, 1, 2)] + [dict(num_workers=0, read_threads=2)]
    if dataset_storage(data_dir) == "mp4":  # FFmpeg's automatic threads: one per core, each process
        runs += [dict(num_workers=0, decode_threads=0), dict(num_workers=2, decode_threads=0)]
    for run in runs:
        def grain_batches(run=run):
            c = config.copy_and_resolve_references()
            c.data.update(run)
            return make_pipeline(data_dir, c, batch_size=batch, seed=0, tokenizer=tokenizer)
        cases.append((f"grain, {run['num_workers']} workers" + "".join(
            f", {k}={v}" for k, v in run.items() if k != "num_workers"), grain_batches))
    rows = []
    for name, make in cases:
        say(f"{label}: {name}, {num_batches} batches of {batch} ...")
        batches = make()
        seconds, nbytes = timed(iter(batches), num_batches)
        if hasattr(batches, "close"):
            batches.close()
        films = num_batches * batch
        rows.append(dict(data=label, case=name, films=films, seconds=seconds,
                         films_per_s=films / seconds, mb_per_s=nbytes / seconds / 2**20))
        say(f"{label}: {name}: {rows[-1]['films_per_s']:.1f} films/s")
    base = rows[1]["films_per_s"]
    for r in rows:
        r["ratio_vs_0_workers"] = r["films_per_s"] / base
    say(f"{label}: stage timings ...")
    return (rows, *stages(data_dir, config, tokenizer, batch))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--films", type=int, default=64)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--big-films", type=int, default=16)
    p.add_argument("--big-batches", type=int, default=12)
    p.add_argument("--big-size", default="480x832", help="HxW of the large clips")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "data_pipeline.json"))
    args = p.parse_args()
    h, w = (int(x) for x in args.big_size.split("x"))
    tokenizer = world_tokenizer()
    tiny = load_config("tiny")
    big = load_config("tiny", [f"--config.video.height={h}", f"--config.video.width={w}"])
    rows, stage_ms, stored_kb = [], {}, {}

    def measure(label, data_dir, config, num_batches):
        r, stage_ms[label], stored_kb[label] = run_dataset(label, data_dir, config, tokenizer,
                                                           args.batch, num_batches)
        rows.extend(r)

    for label, config, films, num_batches in ((f"{tiny.video.height}x{tiny.video.width}", tiny,
                                               args.films, args.batches),
                                              (f"{h}x{w}", big, args.big_films, args.big_batches)):
        with tempfile.TemporaryDirectory() as data_dir:
            say(f"{label}: building {films} films ({config.video.num_frames} frames) ...")
            write_synthetic_dataset(data_dir, films, seed=0, config=config)
            measure(label, data_dir, config, num_batches)
            if config is big:  # the same films, stored as H.264 records
                mp4 = config.copy_and_resolve_references()
                mp4.data.storage = "mp4"
                say(f"{label} mp4: building {films} films with storage mp4 ...")
                build_dataset(os.path.join(data_dir, "manifest.jsonl"),
                              os.path.join(data_dir, "mp4"), mp4)
                measure(f"{label} mp4", os.path.join(data_dir, "mp4"), config, num_batches)
    print(f"{'data':12} {'case':34} {'films/s':>8} {'MB/s':>8} {'vs 0 w':>7}")
    for r in rows:
        print(f"{r['data']:12} {r['case']:34} {r['films_per_s']:8.1f} {r['mb_per_s']:8.1f} "
              f"{r['ratio_vs_0_workers']:7.2f}")
    names = list(next(iter(stage_ms.values())))
    print(f"\nms per film {'':5}" + "".join(f"{n:>14}" for n in names)
          + f"{'stored KB':>11}{'bound 2w':>10}")
    for label, ms in stage_ms.items():
        print(f"{label:16}" + "".join(f"{ms[n]:14.2f}" for n in names)
              + f"{stored_kb[label]:11.0f}{bound_2_workers(ms):10.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, cpus=os.cpu_count(),
                       load_avg=os.getloadavg(), args=vars(args), rows=rows,
                       stages_ms_per_film=stage_ms, stored_kb_per_film=stored_kb,
                       bound_2_workers={k: bound_2_workers(v) for k, v in stage_ms.items()}),
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
