"""Video I/O with PyAV: probe, decode (seek, frame range, fps resample, resize), mp4/H.264 encode
to a file or to bytes and decode from bytes; the uint8 -> [-1, 1] float conversion models take
(`to_unit_range`).

    info = probe_video("a.mp4")                       # VideoInfo(num_frames, fps, height, width)
    clip = read_video("a.mp4", start=40, num_frames=33, fps=8, size=(64, 64))  # uint8 [33,64,64,3]
    write_video("b.mp4", clip, fps=8)
    data = encode_mp4(clip, fps=8)                    # the same mp4 as bytes
    same = decode_mp4(data, threads=1)                # uint8 [33,64,64,3], decoded from memory
    x = to_unit_range(clip)                           # float32 [33,64,64,3] in [-1, 1], jnp

Frame indices are source frames of the file. Resampling to `fps` picks, for output frame k, the
source frame `start + floor(k * src_fps / fps)` (nearest previous frame; `resample_indices`).
Every failure raises `VideoError` with the file and a short machine-readable `reason`
(`missing`, `empty`, `not_video`, `corrupt`, `no_video_stream`, `decode_error`, `too_short`),
which the dataset build counts per reason. `corrupt`: a video container's signature (mp4, mkv/webm,
avi, ogg, flv) that FFmpeg cannot open, e.g. a truncated mp4; `not_video`: anything else.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from fractions import Fraction

import av
import jax.numpy as jnp
import numpy as np

from holocine_jax.files import atomic_file

REASONS = ("missing", "empty", "not_video", "corrupt", "no_video_stream", "decode_error",
           "too_short")


def _has_video_signature(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    return (head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide")
            or head[:4] in (b"\x1aE\xdf\xa3", b"OggS") or head[:3] == b"FLV"
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI "))


class VideoError(Exception):
    """A video that cannot be used: `path` and `reason` (one of REASONS) name what went wrong."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    height: int
    width: int
    codec: str


def _open(path: str):
    if not os.path.exists(path):
        raise VideoError(path, "missing")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "empty")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError, OSError) as e:
        reason = "corrupt" if _has_video_signature(path) else "not_video"
        raise VideoError(path, reason, str(e)) from None
    if not container.streams.video:
        container.close()
        raise VideoError(path, "no_video_stream")
    return container


def _fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise VideoError(stream.container.name, "no_video_stream", "stream has no frame rate")
    return float(rate)


def _count_frames(container, stream) -> int:
    """Frame count from the header, or by demuxing packets (no decoding) when it is missing."""
    if stream.frames > 0:
        return int(stream.frames)
    n = sum(1 for p in container.demux(stream) if p.size > 0)
    container.seek(0)
    return n


def probe_video(path: str) -> VideoInfo:
    """Header facts of the first video stream (frame count by packet demux if not in the header)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            n = _count_frames(container, stream)
        except av.FFmpegError as e:
            raise VideoError(path, "decode_error", str(e)) from None
        return VideoInfo(str(path), n, _fps(stream), stream.codec_context.height,
                         stream.codec_context.width, stream.codec_context.name)


def resample_indices(num_out: int, start: int, src_fps: float, fps: float | None) -> np.ndarray:
    """[num_out] int64 source frame of each output frame: start + floor(k * src_fps / fps)."""
    step = 1.0 if fps is None else src_fps / fps
    return start + np.floor(np.arange(num_out) * step + 1e-6).astype(np.int64)


def to_unit_range(video) -> jnp.ndarray:
    """uint8 pixels [..., 3] -> float32 x / 127.5 - 1 in [-1, 1]; float input (already in
    [-1, 1]) passes as float32. The one place of this conversion: pipelines ship uint8 and the
    compiled batch encoder (train/step.py) converts on device. Other dtypes are a ValueError."""
    video = jnp.asarray(video)
    if video.dtype == jnp.uint8:
        return video.astype(jnp.float32) / 127.5 - 1.0
    if jnp.issubdtype(video.dtype, jnp.floating):
        return video.astype(jnp.float32)
    raise ValueError(f"video must be uint8 pixels or float in [-1, 1], got dtype {video.dtype}")


def _resize(frame, size, mode: str) -> np.ndarray:
    """av.VideoFrame -> uint8 [h, w, 3]; mode `crop` keeps aspect (cover + centre crop)."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    h, w = size
    if mode == "stretch":
        return frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    if mode != "crop":
        raise ValueError(f"resize mode must be 'crop' or 'stretch', got {mode!r}")
    scale = max(h / frame.height, w / frame.width)
    sh, sw = max(h, round(frame.height * scale)), max(w, round(frame.width * scale))
    rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (sh - h) // 2, (sw - w) // 2
    return rgb[top:top + h, left:left + w]


def read_video(path: str, *, start: int = 0, num_frames: int | None = None,
               fps: float | None = None, size: tuple[int, int] | None = None,
               resize: str = "crop") -> np.ndarray:
    """Decode frames as uint8 [T, H, W, 3].

    start: first source frame (seeks to the keyframe before it, then decodes forward).
    num_frames: output frames (after resampling to `fps`); None = as many as the file holds.
    fps: output frame rate (None: the file's). size: (H, W) output; resize `crop` (keep aspect,
    centre crop) or `stretch`. Raises VideoError `too_short` if the range runs past the end.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        src_fps = _fps(stream)
        try:
            total = _count_frames(container, stream)
            if num_frames is None:
                step = 1.0 if fps is None else src_fps / fps
                num_frames = max(0, math.ceil((total - start) / step - 1e-6))
            want = resample_indices(num_frames, start, src_fps, fps)
            if start < 0 or num_frames <= 0 or want[-1] >= total:
                last = int(want[-1]) if num_frames > 0 else start
                raise VideoError(path, "too_short", f"needs source frames {start}..{last}, "
                                 f"file has {total}")
            frames = _decode(container, stream, want, src_fps, size, resize)
        except av.FFmpegError as e:
            raise VideoError(path, "decode_error", str(e)) from None
    if len(frames) < num_frames:
        raise VideoError(path, "too_short", f"decoded {len(frames)} of {num_frames} frames "
                         f"(stream ends early or is truncated)")
    return np.stack(frames)


def _decode(container, stream, want: np.ndarray, src_fps: float, size, resize) -> list:
    """Decode the source frames in `want` (sorted, may repeat) after seeking near want[0]."""
    base = stream.start_time or 0
    tb = stream.time_base
    seeked = want[0] > 0
    if seeked:
        container.seek(base + int(want[0] / src_fps / tb), stream=stream, backward=True,
                       any_frame=False)
    out, j, counter = [], 0, 0
    for frame in container.decode(stream):
        if frame.pts is None:
            if seeked:
                raise VideoError(container.name, "decode_error", "frames carry no timestamps")
            index, counter = counter, counter + 1
        else:
            index = round(float((frame.pts - base) * tb) * src_fps)
        if index < want[j]:
            continue
        rgb = None
        while j < len(want) and want[j] <= index:
            rgb = _resize(frame, size, resize) if rgb is None else rgb
            out.append(rgb)
            j += 1
        if j == len(want):
            break
    return out


def write_video(path: str, frames: np.ndarray, fps: float, *, crf: int = 18,
                preset: str = "veryfast", keyframe_interval: int | None = None) -> None:
    """`encode_mp4(frames, fps, ...)` written atomically to `path`."""
    try:
        data = encode_mp4(frames, fps, crf=crf, preset=preset, keyframe_interval=keyframe_interval)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def encode_mp4(frames: np.ndarray, fps: float, *, crf: int = 18, preset: str = "veryfast",
               keyframe_interval: int | None = None) -> bytes:
    """Encode uint8 [T, H, W, 3] frames (H, W even) as H.264 (yuv420p) in an mp4: its bytes.

    crf: x264 quality (0 lossless .. 51); keyframe_interval: GOP length (None: x264's default).
    Encodes of the same frames are usually, not always, byte-identical (x264/FFmpeg internals);
    decoded pixels then differ by a few levels at most.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T > 0, got {frames.dtype} "
                         f"{frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs even height and width, got {h}x{w}")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        options = {"crf": str(crf), "preset": preset}
        if keyframe_interval:
            options.update(g=str(keyframe_interval), keyint_min=str(keyframe_interval),
                           sc_threshold="0")
        stream.options = options
        # Convert up front and keep every frame alive until the flush: x264 holds frames in its
        # lookahead, and frames freed early made encodes of the same pixels differ.
        yuv = [av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
               for rgb in frames]
        for frame in yuv:
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def decode_mp4(data: bytes, *, threads: int = 1, name: str = "<bytes>",
               alloc=np.empty) -> np.ndarray:
    """Every frame of an in-memory mp4 (e.g. `encode_mp4`'s bytes) as uint8 [T, H, W, 3].

    The frames are written into `alloc((T, H, W, 3), np.uint8)` (T from the mp4 header), e.g.
    shared memory, to hand them to another process without a copy. threads: FFmpeg threads of
    the decoder and of the RGB conversion (1: none; 0: FFmpeg's auto, one per core, which
    oversubscribes the cores when several worker processes decode). Raises VideoError
    `decode_error` (or `no_video_stream`) with `name` as its path, also when the stream does not
    decode to the header's T frames.
    """
    n = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError(name, "no_video_stream")
            stream = container.streams.video[0]
            stream.thread_type, stream.thread_count = "AUTO", threads
            t, ctx = stream.frames, stream.codec_context
            if t <= 0:
                raise VideoError(name, "decode_error", "the header has no frame count")
            out = alloc((t, ctx.height, ctx.width, 3), np.uint8)
            for frame in container.decode(stream):
                if n == t:
                    raise VideoError(name, "decode_error", f"more frames than the header's {t}")
                out[n] = frame.to_ndarray(format="rgb24", threads=threads)
                n += 1
    except (av.FFmpegError, ValueError) as e:
        raise VideoError(name, "decode_error", str(e)) from None
    if n != t:
        raise VideoError(name, "decode_error", f"decoded {n} of the header's {t} frames")
    return out
