"""WanDiT parameters <-> PyTorch tensors named like diffusers (transposes, layer stacking).

`torch_layout(model)` lists every PyTorch tensor the model corresponds to, with its expected
shape; loading validates a checkpoint against it *before* reading any data, so a missing, extra
or mis-shaped tensor is one error that names them all.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from holocine_jax.convert.names import nnx_path_to_diffusers


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model: lists missing, unexpected, mis-shaped."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    path: tuple          # NNX parameter path
    layer: int | None    # index on the stacked `layers` axis, None for unstacked parameters
    kind: str            # "linear" (transpose), "conv" (permute) or "same"
    shape: tuple         # PyTorch shape


def _kind(path: tuple, ndim: int) -> str:
    if path[-1] != "kernel":
        return "same"
    return {2: "linear", 5: "conv"}[ndim]


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    """Our array -> PyTorch layout: Linear [in, out] -> [out, in]; Conv3d DHWIO -> OIDHW."""
    return {"linear": lambda a: a.T, "conv": lambda a: a.transpose(4, 3, 0, 1, 2)}.get(kind, lambda a: a)(x)


def from_torch(kind: str, x: np.ndarray) -> np.ndarray:
    """PyTorch layout -> ours (inverse of `to_torch`)."""
    return {"linear": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 4, 1, 0)}.get(kind, lambda a: a)(x)


def torch_layout(model: nnx.Module) -> dict[str, TensorEntry]:
    """{diffusers tensor name: TensorEntry} for a (possibly abstract) WanDiT."""
    entries = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(var.get_value().shape)
        stacked = path[0] == "blocks"
        own = shape[1:] if stacked else shape
        kind = _kind(path, len(own))
        torch_shape = tuple(to_torch(kind, np.empty(own, np.uint8)).shape)
        for layer in (range(shape[0]) if stacked else [None]):
            entries[nnx_path_to_diffusers(path, layer)] = TensorEntry(path, layer, kind, torch_shape)
    return entries


def check_tensors(layout: dict[str, TensorEntry], shapes: dict[str, tuple], source: str) -> None:
    """Raise one CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor."""
    missing = [f"{n} (expected shape {list(e.shape)})" for n, e in layout.items() if n not in shapes]
    extra = [f"{n} (shape {list(s)})" for n, s in shapes.items() if n not in layout]
    wrong = [f"{n}: got {list(shapes[n])}, expected {list(e.shape)}"
             for n, e in layout.items() if n in shapes and tuple(shapes[n]) != e.shape]
    if missing or extra or wrong:
        parts = [f"{title} ({len(items)}): " + "; ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                 for title, items in (("missing tensors", missing), ("unexpected tensors", extra),
                                      ("mis-shaped tensors", wrong)) if items]
        raise CheckpointMismatchError(f"checkpoint {source} does not match the model: " + " | ".join(parts))


def fill_params(abstract: nnx.Module, get, layout: dict[str, TensorEntry], param_dtype) -> nnx.Module:
    """Build the model from `abstract` with tensors `get(diffusers_name) -> np.ndarray`.

    Stacked block parameters are assembled one layer at a time into one host buffer, then moved
    to the device; peak host memory is one parameter group, not a second copy of the model.
    """
    by_path = {}
    for name, entry in layout.items():
        by_path.setdefault(entry.path, []).append((entry.layer, name))
    graphdef, state = nnx.split(abstract)
    dtype = jnp.dtype(param_dtype)
    for path, var in nnx.to_flat_state(state):
        if path not in by_path:
            continue
        items = by_path[path]
        kind = layout[items[0][1]].kind
        if items[0][0] is None:
            value = from_torch(kind, get(items[0][1])).astype(dtype)
        else:
            value = np.empty(var.get_value().shape, dtype)
            for layer, name in items:
                value[layer] = from_torch(kind, get(name))
        var.set_value(jnp.asarray(value))
        del value
    return nnx.merge(graphdef, state)


def tensor_producer(model: nnx.Module, layout: dict[str, TensorEntry], dtype=None):
    """(sizes {name: bytes}, produce(name) -> PyTorch-layout np.ndarray) for writing."""
    flat = {path: var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    def out_dtype(path):
        return jnp.dtype(dtype) if dtype is not None else jnp.dtype(flat[path].get_value().dtype)

    def produce(name):
        entry = layout[name]
        value = flat[entry.path].get_value()
        value = value[entry.layer] if entry.layer is not None else value
        return to_torch(entry.kind, np.asarray(value)).astype(out_dtype(entry.path))

    sizes = {n: int(np.prod(e.shape)) * out_dtype(e.path).itemsize for n, e in layout.items()}
    return sizes, produce
