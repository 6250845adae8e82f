"""Training metrics: clu metric writers (TensorBoard + console + metrics.jsonl) and the
per-interval summary of the step's metrics (loss per timestep bucket, throughput, skips).

clu's `metric_writers` package imports TensorFlow for its summary writer. TensorFlow is not a
dependency here, so when it is missing `metric_writers()` registers an empty module under that
name before importing clu, and TensorBoard files are written with tensorboardX instead.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types

import jax
import numpy as np

from holocine_jax import files
from holocine_jax.flow import NUM_TRAIN_TIMESTEPS


def metric_writers():
    """The `clu.metric_writers` module, importable without TensorFlow."""
    name = "clu.metric_writers.summary_writer"
    if name not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        placeholder = types.ModuleType(name)
        placeholder.SummaryWriter = None  # clu's TF writer; TensorboardWriter below replaces it
        sys.modules[name] = placeholder
    from clu import metric_writers as mw
    return mw


def periodic_actions():
    """`clu.periodic_actions` (it imports clu.metric_writers), importable without TensorFlow."""
    metric_writers()
    from clu import periodic_actions as pa
    return pa


def make_writer(logdir: str, *, console: bool = True, total_steps: int | None = None):
    """TensorBoard event files + `metrics.jsonl` under `logdir` (async), and with `console` one
    progress line per training summary on stderr (`ConsoleWriter`, synchronous). On a multi-host
    run only process 0 writes the files (every process computes the same global metrics)."""
    mw = metric_writers()
    if jax.process_index() > 0:
        return mw.MultiWriter([_console_writer(mw, total_steps)] if console else [])
    outputs = mw.AsyncMultiWriter([_tensorboard_writer(mw, logdir),
                                   _jsonl_writer(mw, os.path.join(logdir, "metrics.jsonl"))])
    return mw.MultiWriter([outputs, _console_writer(mw, total_steps)]) if console else outputs


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(step: int, scalars: dict, total_steps: int | None = None) -> str:
    """`train: step 20/300, loss 0.4123, 2.31 steps/s, ETA 2m01s` from a `MetricsBuffer.summary()`
    (plus the skipped-step count when there are any)."""
    rate = scalars.get("perf/steps_per_sec")
    parts = [f"train: step {step}" + (f"/{total_steps}" if total_steps else ""),
             f"loss {scalars['train/loss']:.4f}"]
    if rate:
        parts.append(f"{rate:.2f} steps/s")
        if total_steps:
            parts.append(f"ETA {format_duration((total_steps - step) / rate)}")
    if scalars.get("train/skipped_steps"):
        parts.append(f"{int(scalars['train/skipped_steps'])} skipped")
    return ", ".join(parts)


def console(message: str) -> None:
    """One progress line on stderr, shown at once (no logging configuration needed)."""
    print(message, file=sys.stderr, flush=True)


def _console_writer(mw, total_steps):
    class ConsoleWriter(_scalar_writer(mw)):
        """Prints `progress_line` for each scalar write holding "train/loss" (the training
        summary); other writes are for TensorBoard and metrics.jsonl."""

        def write_scalars(self, step, scalars):
            if "train/loss" in scalars:
                console(progress_line(int(step), scalars, total_steps))

    return ConsoleWriter()


def _tensorboard_writer(mw, logdir):
    if sys.modules["clu.metric_writers.summary_writer"].SummaryWriter is not None:
        return mw.SummaryWriter(logdir)
    import tensorboardX

    class TensorboardWriter(mw.MetricWriter):
        """clu MetricWriter on tensorboardX (scalars, images, videos, texts, histograms, hparams)."""

        def __init__(self, logdir):
            self._writer = tensorboardX.SummaryWriter(logdir)

        def write_summaries(self, step, values, metadata=None):
            self.write_scalars(step, {k: v for k, v in values.items() if np.ndim(v) == 0})

        def write_scalars(self, step, scalars):
            for k, v in scalars.items():
                self._writer.add_scalar(k, float(v), global_step=step)

        def write_images(self, step, images):
            for k, v in images.items():
                self._writer.add_images(k, np.asarray(v), global_step=step, dataformats="NHWC")

        def write_videos(self, step, videos):
            # tensorboardX's add_video needs moviepy and, without it, logs and writes nothing;
            # an animated GIF in an image summary is what it would write, and TensorBoard plays it.
            from tensorboardX.proto.summary_pb2 import Summary

            for k, v in videos.items():  # [N, T, H, W, C] or [T, H, W, C]; uint8 or [0, 1]
                v = np.asarray(v)
                for n, clip in enumerate(v if v.ndim == 5 else v[None]):
                    image = Summary.Image(height=clip.shape[1], width=clip.shape[2],
                                          colorspace=clip.shape[3], encoded_image_string=gif_bytes(clip))
                    tag = k if n == 0 else f"{k}/{n}"
                    self._writer._get_file_writer().add_summary(
                        Summary(value=[Summary.Value(tag=tag, image=image)]), step)

        def write_audios(self, step, audios, *, sample_rate):
            for k, v in audios.items():
                self._writer.add_audio(k, np.asarray(v)[0, :, 0], global_step=step, sample_rate=sample_rate)

        def write_texts(self, step, texts):
            for k, v in texts.items():
                self._writer.add_text(k, v, global_step=step)

        def write_histograms(self, step, arrays, num_buckets=None):
            for k, v in arrays.items():
                self._writer.add_histogram(k, np.asarray(v), global_step=step)

        def write_hparams(self, hparams):
            self._writer.add_text("hparams", json.dumps(dict(hparams), default=str, indent=1))

        def flush(self):
            self._writer.flush()

        def close(self):
            self._writer.close()

    return TensorboardWriter(logdir)


def gif_bytes(clip, fps: float = 8.0) -> bytes:
    """An animated GIF (looping) of clip [T, H, W, 3] (uint8, or float in [0, 1])."""
    import io

    from PIL import Image

    clip = np.asarray(clip)
    if clip.dtype != np.uint8:
        clip = (np.clip(clip, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    frames = [Image.fromarray(f[..., :3] if f.shape[-1] >= 3 else f[..., 0]) for f in clip]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:],
                   duration=int(round(1000 / fps)), loop=0)
    return out.getvalue()


def _scalar_writer(mw):
    class ScalarWriter(mw.MetricWriter):
        """A MetricWriter of scalars only: summaries keep their scalar values, other kinds are
        TensorBoard's job and are ignored."""

        def write_summaries(self, step, values, metadata=None):
            self.write_scalars(step, {k: v for k, v in values.items() if np.ndim(v) == 0})

        def write_images(self, step, images): pass
        def write_videos(self, step, videos): pass
        def write_audios(self, step, audios, *, sample_rate): pass
        def write_texts(self, step, texts): pass
        def write_histograms(self, step, arrays, num_buckets=None): pass
        def write_hparams(self, hparams): pass
        def flush(self): pass
        def close(self): pass

    return ScalarWriter


def _jsonl_writer(mw, path):
    class JsonlWriter(_scalar_writer(mw)):
        """Scalars as one JSON line per write: {"step": s, name: value, ...}."""

        def __init__(self, path):
            self._path, self._file = path, None
            if files.is_gcs(path):   # GCS objects do not append: the whole file, rewritten
                self._text = files.read_text(path) if files.exists(path) else ""
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self._file = open(path, "a")

        def write_scalars(self, step, scalars):
            line = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n"
            if self._file is None:
                self._text += line
                files.write_text(self._path, self._text)
            else:
                self._file.write(line)

        def flush(self):
            if self._file is not None:
                self._file.flush()

        def close(self):
            if self._file is not None:
                self._file.close()

    return JsonlWriter(path)


def read_metrics(path: str) -> dict[int, dict]:
    """metrics.jsonl -> {step: {name: value}}; a step written twice (a resumed run repeating
    steps after its last checkpoint) keeps its last record."""
    out: dict[int, dict] = {}
    for line in files.read_text(path).splitlines():
        if line.strip():
            record = json.loads(line)
            out.setdefault(record.pop("step"), {}).update(record)
    return out


class MetricsBuffer:
    """Collects the step's metrics (device arrays, fetched only at `summary()`), and turns an
    interval into scalars: means, loss per timestep bucket, steps/s and tokens/s (and with
    caption dropout the fraction of films dropped and their mean loss)."""

    SCALARS = ("loss", "grad_norm", "update_norm", "param_norm", "learning_rate")

    def __init__(self, num_buckets: int = 4):
        self.num_buckets = num_buckets
        self._steps: list[dict] = []
        self._tokens = 0
        self._start = time.perf_counter()

    def add(self, metrics: dict, tokens: int):
        self._steps.append(metrics)
        self._tokens += tokens

    def summary(self) -> dict[str, float]:
        """Scalars for the steps since the last summary (then resets)."""
        steps = jax.device_get(self._steps)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        out = {f"train/{k}": float(np.mean([s[k] for s in steps])) for k in self.SCALARS}
        out["train/skipped_in_interval"] = float(sum(s["skipped"] for s in steps))
        losses = np.concatenate([np.ravel(s["sample_loss"]) for s in steps])
        t = np.concatenate([np.ravel(s["timesteps"]) for s in steps])
        width = NUM_TRAIN_TIMESTEPS / self.num_buckets
        bucket = np.minimum((t // width).astype(int), self.num_buckets - 1)
        for i in range(self.num_buckets):
            if np.any(bucket == i):
                out[f"train/loss_t{int(i * width):04d}_{int((i + 1) * width):04d}"] = float(
                    np.mean(losses[bucket == i]))
        if all("caption_dropped" in s for s in steps):   # caption dropout: its rate and loss
            dropped = np.concatenate([np.ravel(s["caption_dropped"]) for s in steps]) > 0.5
            out["train/caption_dropped"] = float(np.mean(dropped))
            if dropped.any():
                out["train/loss_unconditional"] = float(np.mean(losses[dropped]))
        out["perf/steps_per_sec"] = len(steps) / elapsed
        out["perf/tokens_per_sec"] = self._tokens / elapsed
        self._steps, self._tokens, self._start = [], 0, time.perf_counter()
        return out
