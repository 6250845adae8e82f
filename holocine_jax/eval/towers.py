"""What the evaluation towers (eval/clip.py, eval/vit.py) share, in Flax NNX (DESIGN §12).

- `TowerArch` + `Encoder`: pre-LayerNorm transformer layers stacked on a leading layer axis and run
  under `nnx.scan`: x += ls1 * attn(ln1 x), then x += ls2 * mlp(ln2 x) (ls: DINOv2's layer scale,
  else 1); mlp = fc2(act(fc1 x)), or SwiGLU w_out(silu(a) * b) with [a, b] = w_in x.
- `patch_tokens`: the stride-p patch convolution as an einsum over its PyTorch weight [D, C, p, p].
- `position_table`: a [1 + g*g, D] position table (class position first) at another patch grid,
  bicubic exactly as `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`.
- `resize_shortest`: frames' shorter side to `size`, antialiased, like torchvision's tensor `Resize`.
- Loading: `read_config` (the directory's config.json, its model_type checked) and `load_tower`
  (checkpoint names from the towers' rename tables, every mismatch in one error, then filled).
- `ShardedEmbedder` / `embed_sharded`: a tower method jitted over the mesh's batch axes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from holocine_jax.convert.layout import TensorEntry, check_tensors, fill_params
from holocine_jax.convert.safetensors_io import SafetensorsReader
from holocine_jax.parallel.mesh import batch_shardings, logical_spec

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
BATCH_RULES = (("batch", ("data", "fsdp")),)  # the base config's batch rule (config.mesh.rules)


@dataclasses.dataclass(frozen=True)
class TowerArch:
    """One encoder stack: width, heads, FFN width (SwiGLU: its hidden width), depth, options."""
    hidden: int
    heads: int
    mlp: int
    layers: int
    eps: float
    act: str = "gelu"
    qkv_bias: bool = True
    layer_scale: bool = False   # DINOv2: per-channel scales on both residual branches
    swiglu: bool = False        # DINOv2 `use_swiglu_ffn`
    causal: bool = False        # CLIP's text tower
    dtype: str = "float32"      # parameters and activations

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} does not split into {self.heads} heads")


def _linear(arch: TowerArch, n_in: int, n_out: int, rngs, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=arch.dtype, param_dtype=arch.dtype, rngs=rngs)


def layer_norm(arch: TowerArch, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch.nn.LayerNorm(hidden, eps): biased variance about the mean, computed in float32."""
    return nnx.LayerNorm(arch.hidden, epsilon=arch.eps, use_fast_variance=False, dtype=jnp.float32,
                         param_dtype=arch.dtype, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention, x: [B, L, D] -> [B, L, D] (causal: query i sees keys j <= i)."""

    def __init__(self, arch: TowerArch, rngs: nnx.Rngs):
        d = arch.hidden
        self.q, self.k, self.v = (_linear(arch, d, d, rngs, arch.qkv_bias) for _ in range(3))
        self.o = _linear(arch, d, d, rngs)
        self.heads, self.causal = arch.heads, arch.causal

    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, d = x.shape
        split = lambda t: t.reshape(b, length, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits * (d // self.heads) ** -0.5
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits,
                               jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.o(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, d))


class Mlp(nnx.Module):
    """fc2(act(fc1 x)), x: [B, L, D] -> [B, L, D]."""

    def __init__(self, arch: TowerArch, rngs: nnx.Rngs):
        self.fc1 = _linear(arch, arch.hidden, arch.mlp, rngs)
        self.fc2 = _linear(arch, arch.mlp, arch.hidden, rngs)
        self.act = ACTIVATIONS[arch.act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nnx.Module):
    """w_out(silu(a) * b) with [a, b] = w_in x (DINOv2's fused `weights_in` [2F, D]); x: [B, L, D]."""

    def __init__(self, arch: TowerArch, rngs: nnx.Rngs):
        self.w_in = _linear(arch, arch.hidden, 2 * arch.mlp, rngs)
        self.w_out = _linear(arch, arch.mlp, arch.hidden, rngs)

    def __call__(self, x):
        gate, up = jnp.split(self.w_in(x), 2, axis=-1)
        return self.w_out(jax.nn.silu(gate) * up)


class EncoderLayer(nnx.Module):
    """Pre-LN layer, x: [B, L, D] -> [B, L, D]."""

    def __init__(self, arch: TowerArch, rngs: nnx.Rngs):
        self.ln1, self.attn, self.ln2 = layer_norm(arch, rngs), Attention(arch, rngs), layer_norm(arch, rngs)
        self.mlp = (SwiGLU if arch.swiglu else Mlp)(arch, rngs)
        scale = lambda: nnx.Param(jnp.ones((arch.hidden,), arch.dtype))  # noqa: E731  [D]
        self.ls1, self.ls2 = (scale(), scale()) if arch.layer_scale else (None, None)

    def __call__(self, x):
        h = self.attn(self.ln1(x).astype(x.dtype))
        x = x + (h if self.ls1 is None else h * self.ls1[...])
        h = self.mlp(self.ln2(x).astype(x.dtype))
        return x + (h if self.ls2 is None else h * self.ls2[...])


class Encoder(nnx.Module):
    """`arch.layers` EncoderLayers stacked on a leading axis (`layers`), run under nnx.scan."""

    def __init__(self, arch: TowerArch, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=arch.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return EncoderLayer(arch, rngs=rngs)

        self.layers = create(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        scan = nnx.scan(lambda layer, x: layer(x), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        return scan(self.layers, x)


def patch_tokens(pixels: jax.Array, weight: jax.Array, bias: jax.Array | None = None):
    """pixels [N, H, W, C] -> (tokens [N, h*w, D], (h, w)), h = H // p: Conv2d(C, D, p, stride p)
    with its PyTorch weight [D, C, p, p] (rows/columns past the last whole patch are dropped)."""
    _, _, p, _ = weight.shape
    n, height, width, c = pixels.shape
    h, w = height // p, width // p
    x = pixels[:, :h * p, :w * p].astype(weight.dtype).reshape(n, h, p, w, p, c)
    out = jnp.einsum("nhpwqc,dcpq->nhwd", x, weight)
    out = out if bias is None else out + bias
    return out.reshape(n, h * w, -1), (h, w)


def torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's 1-D bicubic resize (align_corners=False, A = -0.75, source
    taps clamped to the border): out = M @ in."""
    a, scale = -0.75, n_in / n_out
    near = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1          # noqa: E731  |t| <= 1
    far = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a     # noqa: E731  1 < |t| < 2
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        x = (i + 0.5) * scale - 0.5
        x0 = math.floor(x)
        t = x - x0
        for tap, weight in zip(range(x0 - 1, x0 + 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[i, min(max(tap, 0), n_in - 1)] += weight
    return m


def position_table(table: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """table [1 + g*g, D] (class position, then the g x g grid row-major) -> [1 + h*w, D] for patch
    grid (h, w): unchanged when (h, w) == (g, g), else the grid part resized bicubically (as
    transformers' `interpolate_pos_encoding`)."""
    g, (h, w) = math.isqrt(table.shape[0] - 1), grid
    if g * g != table.shape[0] - 1:
        raise ValueError(f"position table of {table.shape[0]} rows is not 1 + a square grid")
    if (h, w) == (g, g):
        return table
    mh, mw = (jnp.asarray(torch_bicubic_matrix(g, n), jnp.float32) for n in (h, w))
    patch = jnp.einsum("ia,jb,abd->ijd", mh, mw, table[1:].reshape(g, g, -1).astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([table[:1], patch.reshape(h * w, -1).astype(table.dtype)])


@functools.partial(jax.jit, static_argnames=("shape", "method"))
def _resize(frames, shape, method):
    return jax.image.resize(frames.astype(jnp.float32), shape, method, antialias=True)


def resize_shortest(frames, size: int, method: str, chunk: int = 32) -> jax.Array:
    """uint8/float frames [N, H, W, C] -> float32 [N, H', W', C] (values kept in the input's range,
    no rounding): the shorter side becomes `size`, the longer int(size * long / short), as
    torchvision's `Resize(size)` on tensors (antialiased; `method` "cubic" or "linear")."""
    n, h, w, c = frames.shape
    shape = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    parts = [frames[i:i + chunk] for i in range(0, n, chunk)]
    parts = [_resize(jnp.asarray(part), (len(part), *shape, c), method) for part in parts]
    return jnp.concatenate(parts) if parts else jnp.zeros((0, *shape, c), jnp.float32)


def center_crop(x: jax.Array, size: int) -> jax.Array:
    """[N, H, W, C] -> [N, size, size, C], offsets int(round((H - size) / 2)) as torchvision."""
    _, h, w, _ = x.shape
    if size > min(h, w):
        raise ValueError(f"cannot centre-crop {size}x{size} from {h}x{w} frames")
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return x[:, top:top + size, left:left + size]


def read_config(path: str, model_types: tuple[str, ...], loader: str) -> dict:
    """The config.json of model directory `path`; FileNotFoundError when there is none, ValueError
    when its model_type is not one of `model_types`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{loader}: {path!r} is not a directory (a local transformers model: "
                                "config.json + model.safetensors)")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{loader}: no config.json in {path!r}")
    with open(file) as f:
        hf = json.load(f)
    if hf.get("model_type") not in model_types:
        raise ValueError(f"{loader}: {path} holds a {hf.get('model_type')!r} model (config.json "
                         f"model_type), expected {' or '.join(map(repr, model_types))}")
    return hf


def _sub(name: str, table: dict) -> str:
    for ours, theirs in table.items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    return name


def renamer(top: dict, stacks: dict, layer: dict):
    """`rename(dotted, index)`: our parameter path (leaf kernel/scale/embedding written `weight`) ->
    checkpoint name; `top` and `layer` map path prefixes, `stacks` maps a stack (the path before
    `.layers.`) to its checkpoint prefix, which the layer index follows."""
    def rename(dotted: str, index: int | None) -> str:
        if index is None:
            return _sub(dotted, top)
        stack, rest = dotted.split(".layers.", 1)
        return f"{stacks[stack]}.{index}.{_sub(rest, layer)}"
    return rename


def tensor_layout(abstract: nnx.Module, rename) -> dict[str, TensorEntry]:
    """{checkpoint tensor name: TensorEntry} of a (possibly abstract) tower; parameters under an
    Encoder's `layers` are stacked (one checkpoint tensor per layer); Linear kernels transposed."""
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
    entries = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        keys = [str(p) for p in path[:-1]] + [leaf.get(str(path[-1]), str(path[-1]))]
        shape, stacked = tuple(var.get_value().shape), "layers" in keys
        own = shape[1:] if stacked else shape
        kind = "linear" if path[-1] == "kernel" else "same"
        torch_shape = own[::-1] if kind == "linear" else own
        for index in range(shape[0]) if stacked else [None]:
            entries[rename(".".join(keys), index)] = TensorEntry(path, index, kind, torch_shape)
    return entries


def load_tower(path: str, build, rename, *, ignore: tuple = (), dtype: str = "float32",
               loader: str = "load_tower") -> nnx.Module:
    """`build()` (an nnx Module) filled from the safetensors of directory `path` (one file or shards
    with an index); checkpoint tensors starting with an `ignore` prefix are skipped, every missing,
    unexpected or mis-shaped one is named in one ValueError before any data is read."""
    try:
        reader = SafetensorsReader(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{loader}: {e} (expected model.safetensors, or shards with "
                                "model.safetensors.index.json)") from None
    abstract = nnx.eval_shape(build)
    layout = tensor_layout(abstract, rename)
    shapes = {n: s for n, s in reader.shapes().items() if not n.startswith(tuple(ignore))}
    check_tensors(layout, shapes, path)
    return fill_params(abstract, reader.get, layout, dtype)


class ShardedEmbedder:
    """`fn`, a bound method of an NNX tower (`clip.image_features`, `vit.features`, ...), jitted over
    the batch axes of `mesh` (the `batch` logical axis under `rules`): inputs [N, ...] run in chunks
    of `batch_size` rows rounded up to a multiple of the batch shards (the last chunk zero-padded),
    placed by `batch_shardings`; the parameters are replicated once. mesh None: one device.
    Multi-host: every process passes the same inputs and gets the whole result."""

    def __init__(self, fn, *, mesh=None, rules=BATCH_RULES, batch_size: int = 64):
        graphdef, state = nnx.split(fn.__self__)
        method = fn.__name__
        self.mesh, self.rules = mesh, rules
        axes = () if mesh is None else jax.tree.leaves(tuple(logical_spec(("batch",), rules, mesh)))
        self.shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
        self.batch_size = -(-batch_size // self.shards) * self.shards
        self.state = state if mesh is None else jax.device_put(state, NamedSharding(mesh, P()))
        self.program = jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))

    def __call__(self, inputs) -> np.ndarray:
        """inputs [N, ...] -> np.ndarray [N, ...] (N = 0 gives an empty result)."""
        x = np.asarray(inputs)
        n = len(x)
        if n == 0:
            out = jax.eval_shape(self.program, self.state, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
            return np.zeros((0, *out.shape[1:]), out.dtype)
        size = min(self.batch_size, -(-n // self.shards) * self.shards)
        outs = []
        for start in range(0, n, size):
            rows = x[start:start + size]
            chunk = np.pad(rows, [(0, size - len(rows))] + [(0, 0)] * (x.ndim - 1))
            if self.mesh is not None:
                chunk = jax.device_put(chunk, batch_shardings(chunk, self.mesh, self.rules))
            out = self.program(self.state, chunk)
            if not out.is_fully_addressable:   # multi-host: every process gets the whole batch
                out = multihost_utils.process_allgather(out, tiled=True)
            outs.append(np.asarray(out)[:len(rows)])
        return np.concatenate(outs)


def embed_sharded(fn, inputs, *, mesh=None, rules=BATCH_RULES, batch_size: int = 64) -> np.ndarray:
    """One-off `ShardedEmbedder(fn, mesh=..., rules=..., batch_size=...)(inputs)` (build the
    embedder once to reuse its compiled program and replicated parameters)."""
    return ShardedEmbedder(fn, mesh=mesh, rules=rules, batch_size=batch_size)(inputs)
