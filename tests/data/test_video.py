"""PyAV video I/O against known rendered content: round trip, cuts, seek/range, fps, resize;
the uint8 -> [-1, 1] conversion."""
import jax
import numpy as np
import pytest

from holocine_jax import world
from holocine_jax.data.cuts import detect_cuts
from holocine_jax.data.video import (VideoError, decode_mp4, encode_mp4, probe_video, read_video,
                                     resample_indices, to_unit_range, write_video)

BITS = 6


def stamp(frames):
    """Write each frame's index as 6 black/white 8x8 blocks in the top-left corner."""
    out = frames.copy()
    for i in range(len(out)):
        for b in range(BITS):
            out[i, :8, 8 * b:8 * b + 8] = 255 * ((i >> b) & 1)
    return out


def read_stamps(frames):
    """Frame indices decoded from the stamps (blocks are robust to H.264 at crf 18)."""
    blocks = frames[:, 1:7, :8 * BITS].astype(np.float32).mean(-1).reshape(len(frames), 6, BITS, 8)
    bits = blocks.mean(axis=(1, 3)) > 128
    return [int(sum(int(v) << b for b, v in enumerate(row))) for row in bits]


@pytest.fixture(scope="module")
def stamped(tmp_path_factory):
    """A 33-frame 8 fps synthetic film with index stamps, keyframes every 8 frames."""
    frames, spec = world.make_film(7, height=64, width=64, num_frames=33)
    frames = stamp(frames)
    path = str(tmp_path_factory.mktemp("video") / "stamped.mp4")
    write_video(path, frames, fps=8, keyframe_interval=8)
    return path, frames, spec


def test_round_trip_keeps_content_and_cuts(tmp_path):
    for seed in range(6):
        frames, spec = world.make_film(seed, height=64, width=64, num_frames=33)
        path = str(tmp_path / f"film{seed}.mp4")
        write_video(path, frames, fps=8)
        info = probe_video(path)
        assert (info.num_frames, info.fps, info.height, info.width, info.codec) == (33, 8.0, 64, 64, "h264")
        decoded = read_video(path)
        assert decoded.shape == frames.shape and decoded.dtype == np.uint8
        assert np.abs(decoded.astype(np.int16) - frames).mean() < 5.0
        assert detect_cuts(decoded) == list(spec.cut_frames), seed
        with open(path, "rb") as f:  # the same decode from memory, with or without threads
            data = f.read()
        for threads in (1, 0):
            np.testing.assert_array_equal(decode_mp4(data, threads=threads), decoded)


def test_mp4_bytes_round_trip_and_decode_errors():
    frames, _ = world.make_film(5, height=64, width=64, num_frames=33)
    data = encode_mp4(frames, fps=8)
    assert data[4:8] == b"ftyp" and np.abs(decode_mp4(data).astype(np.int16) - frames).mean() < 5.0
    for bad in (b"", b"not a video" * 100, data[: len(data) // 2]):
        with pytest.raises(VideoError, match="record 4: decode_error"):
            decode_mp4(bad, name="record 4")


def test_stamps_survive_encoding(stamped):
    path, frames, _ = stamped
    assert read_stamps(frames) == list(range(33))
    assert read_stamps(read_video(path)) == list(range(33))


@pytest.mark.parametrize("start,num", [(0, 5), (13, 10), (8, 8), (23, 10), (32, 1)])
def test_seek_and_frame_range(stamped, start, num):
    path, frames, _ = stamped
    clip = read_video(path, start=start, num_frames=num)
    assert read_stamps(clip) == list(range(start, start + num))
    assert np.abs(clip[:, 8:].astype(np.int16) - frames[start:start + num, 8:]).mean() < 5.0


@pytest.mark.parametrize("fps,expected", [
    (4, list(range(0, 33, 2))),                                  # every other frame, 17 frames
    (16, [k // 2 for k in range(66)]),                           # each frame twice
    (6, [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 20, 21, 22, 24, 25, 26, 28, 29, 30, 32]),
])
def test_fps_resample(stamped, fps, expected):
    path, _, _ = stamped
    assert read_stamps(read_video(path, fps=fps)) == expected
    assert list(resample_indices(len(expected), 0, 8.0, fps)) == expected


def test_fps_resample_with_start(stamped):
    path, _, _ = stamped
    assert read_stamps(read_video(path, start=9, num_frames=6, fps=4)) == [9, 11, 13, 15, 17, 19]


def test_resize_stretch_and_crop(tmp_path):
    spec = world.sample_film(4, num_frames=9, min_shot_latents=1)
    big = world.render_film(spec, height=128, width=128)
    path = str(tmp_path / "big.mp4")
    write_video(path, big, fps=8)
    small = read_video(path, size=(64, 64), resize="stretch").astype(np.float32)
    pooled = big.reshape(9, 64, 2, 64, 2, 3).mean(axis=(2, 4))
    err = np.abs(small - pooled).mean()
    assert small.shape == (9, 64, 64, 3) and err < 5.0
    assert np.abs(small - np.roll(pooled, 8, axis=2)).mean() > 2 * err  # a shifted image is worse
    # Wide source, square crop: the centre 64x64 of a 64x128 render (no scaling needed).
    wide = world.render_film(spec, height=64, width=128)
    wpath = str(tmp_path / "wide.mp4")
    write_video(wpath, wide, fps=8)
    crop = read_video(wpath, size=(64, 64)).astype(np.float32)
    err = np.abs(crop - wide[:, :, 32:96]).mean()
    assert crop.shape == (9, 64, 64, 3) and err < 5.0
    assert np.abs(crop - wide[:, :, :64]).mean() > 2 * err
    # Crop with scaling: 128x256 -> 32x32 equals the centre of a 4x4-pooled render.
    wide2 = world.render_film(spec, height=128, width=256)
    w2path = str(tmp_path / "wide2.mp4")
    write_video(w2path, wide2, fps=8)
    crop2 = read_video(w2path, size=(32, 32)).astype(np.float32)
    ref = wide2.reshape(9, 32, 4, 64, 4, 3).mean(axis=(2, 4))[:, :, 16:48]
    assert np.abs(crop2 - ref).mean() < 8.0


def test_errors_name_file_and_reason(tmp_path, stamped):
    path, _, _ = stamped
    with pytest.raises(VideoError, match="too_short") as e:
        read_video(path, start=30, num_frames=5)
    assert e.value.reason == "too_short" and e.value.path == path
    with pytest.raises(VideoError) as e:
        read_video(str(tmp_path / "nope.mp4"))
    assert e.value.reason == "missing" and "nope.mp4" in str(e.value)
    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(VideoError) as e:
        probe_video(str(tmp_path / "zero.mp4"))
    assert e.value.reason == "empty"
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError) as e:
        read_video(str(tmp_path / "text.mp4"))
    assert e.value.reason == "not_video"
    data = open(path, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # moov atom (at the end) is lost
    with pytest.raises(VideoError) as e:
        read_video(str(tmp_path / "cut.mp4"))
    assert e.value.reason == "corrupt"
    with pytest.raises(ValueError, match="even"):
        write_video(str(tmp_path / "odd.mp4"), np.zeros((2, 63, 64, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(str(tmp_path / "f.mp4"), np.zeros((2, 64, 64, 3), np.float32), fps=8)



def test_encoding_same_frames_decodes_alike(tmp_path):
    frames, _ = world.make_film(3_000_000, num_frames=33, shot_range=(2, 4))
    decoded = []
    for k in range(3):
        write_video(str(tmp_path / f"{k}.mp4"), frames, fps=8)
        decoded.append(read_video(str(tmp_path / f"{k}.mp4")).astype(np.int16))
    for d in decoded[1:]:
        assert np.abs(d - decoded[0]).mean() < 0.5


def test_to_unit_range_is_x_over_127_5_minus_1_eager_and_compiled():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 4, 64)
    want = pixels.astype(np.float32) / 127.5 - 1.0  # what the pipeline's workers used to ship
    for fn in (to_unit_range, jax.jit(to_unit_range)):
        got = np.asarray(fn(pixels))
        assert got.dtype == np.float32 and got.shape == pixels.shape
        # XLA may divide by multiplying with 1/127.5: one float32 ulp (< 2^-23 here) at most
        np.testing.assert_allclose(got, want, rtol=0, atol=2.0**-23)
    halves = np.float16([-1.0, 0.25, 1.0])   # floats are taken as already in [-1, 1]
    np.testing.assert_array_equal(np.asarray(to_unit_range(halves)), [-1.0, 0.25, 1.0])
    with pytest.raises(ValueError, match="uint8 pixels or float.*int16"):
        to_unit_range(np.int16([3]))
