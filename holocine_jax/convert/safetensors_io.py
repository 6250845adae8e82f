"""Streaming safetensors I/O: single files or shards with a `*.safetensors.index.json`.

Reading opens files lazily and returns one tensor at a time (memory-mapped by safetensors);
writing plans shards from sizes first and holds one shard in memory at a time. A truncated or
corrupt file is a ValueError naming the file and, where one tensor is at fault, the tensor.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: a file, a dir with an index, or a dir with files."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
    if indexes:
        index = os.path.join(path, indexes[0])
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (JSON with a 'weight_map' of "
                             f"tensor -> file): {type(e).__name__}: {e}") from None
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
            try:
                handle = safe_open(file, framework="numpy")
            except SafetensorError as e:
                raise ValueError(f"{file} is not a readable safetensors file: "
                                 f"{header_problem(file) or e}") from None
            self._files[file] = handle
            for name in handle.keys():
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in both {self._where[name]} and {file}")
                self._where[name] = file

    def shapes(self) -> dict[str, tuple]:
        """{name: shape} read from the headers only."""
        return {n: tuple(self._files[f].get_slice(n).get_shape()) for n, f in self._where.items()}

    def get(self, name: str) -> np.ndarray:
        file = self._where[name]
        try:
            return self._files[file].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: cannot read tensor {name!r}: {e}") from None


def header_problem(file: str) -> str:
    """What is wrong with the header of a safetensors file ("" if nothing found): the layout is
    an 8-byte little-endian length, that many bytes of JSON {name: {dtype, shape, data_offsets}},
    then the data, each tensor at [begin, end) of it; the first tensor the file cannot hold is
    named."""
    size = os.path.getsize(file)
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header length (empty or truncated)"
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            return (f"the header length says {n} bytes but only {size - 8} follow (truncated, "
                    "or not a safetensors file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"the {n}-byte header is not JSON ({e})"
    if not isinstance(header, dict):
        return f"the header is JSON {type(header).__name__}, not an object"
    data = size - 8 - n
    entries = {k: _extent(v) for k, v in header.items() if k != "__metadata__"}
    for name, extent in sorted(entries.items(), key=lambda kv: kv[1][0] if kv[1] else -1):
        if extent is None:
            return f"tensor {name!r} has a malformed header entry {header[name]!r}"
        begin, end, expect = extent
        if end > data:
            return (f"tensor {name!r} needs data bytes [{begin}, {end}) but the file holds "
                    f"{data} (truncated)")
        if expect is not None and expect != end - begin:
            return (f"tensor {name!r} ({header[name]['dtype']} {header[name]['shape']}) needs "
                    f"{expect} bytes but its data_offsets span {end - begin}")
    return ""


def _extent(entry) -> tuple[int, int, int | None] | None:
    """(begin, end, bytes its dtype and shape need, None for an unknown dtype) of a header
    entry; None when malformed."""
    try:
        begin, end = (int(x) for x in entry["data_offsets"])
        width = DTYPE_BYTES.get(entry["dtype"])
        count = int(np.prod([int(d) for d in entry["shape"]], dtype=np.int64))
    except (TypeError, KeyError, ValueError):
        return None
    return begin, end, None if width is None else width * count


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
