"""Streaming safetensors I/O: single files or shards with a `*.safetensors.index.json`.

Reading opens files lazily and returns one tensor at a time (memory-mapped by safetensors);
writing plans shards from sizes first and holds one shard in memory at a time.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


def _weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: a file, a dir with an index, or a dir with files."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
    if indexes:
        with open(os.path.join(path, indexes[0])) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{indexes[0]} in {path} lists shard files that do not exist: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path!r}")
    return [os.path.join(path, f) for f in files]


class SafetensorsReader:
    """Lazy tensor access over one or many safetensors files: `shapes()`, `get(name)`."""

    def __init__(self, path: str):
        self.path = path
        self._files = {}
        self._where = {}
        for file in _weight_files(path):
            handle = safe_open(file, framework="numpy")
            self._files[file] = handle
            for name in handle.keys():
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in both {self._where[name]} and {file}")
                self._where[name] = file

    def shapes(self) -> dict[str, tuple]:
        """{name: shape} read from the headers only."""
        return {n: tuple(self._files[f].get_slice(n).get_shape()) for n, f in self._where.items()}

    def get(self, name: str) -> np.ndarray:
        return self._files[self._where[name]].get_tensor(name)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group names (in order) into shards of at most `max_shard_bytes` (one tensor may exceed)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return shards + [current] if current else shards


def write_sharded(out_dir: str, sizes: dict[str, int], produce, max_shard_bytes: int,
                  weights_name: str = WEIGHTS_NAME) -> list[str]:
    """Write tensors `produce(name) -> np.ndarray` into shards of `out_dir`; returns file names.

    One file when everything fits, else `name-0000i-of-0000n.safetensors` plus an index.
    """
    shards = plan_shards(sizes, max_shard_bytes)
    stem = weights_name[: -len(".safetensors")]
    names = ([weights_name] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, shard in zip(names, shards):
        save_file({n: np.ascontiguousarray(produce(n)) for n in shard}, os.path.join(out_dir, file),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(sizes.values()))},
                 "weight_map": {n: f for f, shard in zip(names, shards) for n in shard}}
        with open(os.path.join(out_dir, weights_name + ".index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return names
