"""Truncated or corrupt safetensors files: a ValueError naming the file and, where one tensor is
at fault, the tensor (safetensors alone says only e.g. `invalid header length`)."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from holocine_jax.convert.safetensors_io import SafetensorsReader


@pytest.fixture
def weights(tmp_path):
    """A good file: a [4, 8] float32 tensor then a [16] float16 one; returns (path, header)."""
    path = str(tmp_path / "model.safetensors")
    save_file({"a.weight": np.ones((4, 8), np.float32), "b.bias": np.zeros(16, np.float16)}, path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert SafetensorsReader(path).get("a.weight").shape == (4, 8)
    return path, header


def rewrite(path, header=None, cut=None, raw=None):
    """Replace the file by `raw`, or by its data under a new JSON `header` / cut to `cut` bytes."""
    data = open(path, "rb").read()
    if header is not None:
        n = int.from_bytes(data[:8], "little")
        text = json.dumps(header).encode()
        text += b" " * max(0, n - len(text))
        data = len(text).to_bytes(8, "little") + text + data[8 + n:]
    data = raw if raw is not None else data[:cut] if cut is not None else data
    open(path, "wb").write(data)


def test_truncated_file_names_the_file_and_the_first_cut_tensor(weights):
    path, header = weights
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    rewrite(path, cut=os.path.getsize(path) - 3)
    with pytest.raises(ValueError) as e:
        SafetensorsReader(path)
    assert path in str(e.value) and f"tensor {last!r} needs data bytes" in str(e.value)
    assert "truncated" in str(e.value)


def test_offsets_that_disagree_with_the_shape_name_the_tensor(weights):
    path, header = weights
    header["a.weight"]["shape"] = [4, 9]
    rewrite(path, header=header)
    with pytest.raises(ValueError, match=r"tensor 'a\.weight' \(F32 \[4, 9\]\) needs 144 bytes but "
                                         r"its data_offsets span 128"):
        SafetensorsReader(path)


@pytest.mark.parametrize("raw, problem", [
    (b"", "0 bytes, shorter than the 8-byte header length"),
    ((10 ** 6).to_bytes(8, "little") + b"{}", "the header length says 1000000 bytes but only 2 follow"),
    ((5).to_bytes(8, "little") + b"{abc}", "the 5-byte header is not JSON"),
    ((2).to_bytes(8, "little") + b"[]", "the header is JSON list, not an object"),
])
def test_corrupt_header_names_the_file_and_the_problem(weights, raw, problem):
    path, _ = weights
    rewrite(path, raw=raw)
    with pytest.raises(ValueError, match="is not a readable safetensors file") as e:
        SafetensorsReader(path)
    assert str(e.value).startswith(path) and problem in str(e.value)


def test_corrupt_index_names_the_index(tmp_path, weights):
    path, _ = weights
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text('{"weight_map": ')
    with pytest.raises(ValueError, match="index.json is not a safetensors index"):
        SafetensorsReader(str(tmp_path))
