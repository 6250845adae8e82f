"""TFDS dataset (ArrayRecord shards) of training clips, built from a JSONL manifest.

    report = build_dataset("films.jsonl", "/data/clips", config)     # skips bad input, counts it
    report = write_synthetic_dataset("/data/synth", num_films=64, seed=0, config=config)
    source = load_data_source("/data/clips")                         # random access, len(source)

Each example: `video`, the clip (config.video: num_frames at fps, height x width,
aspect-preserving crop) stored as below, `global_caption`, `shot_captions` [K], `cut_frames`
[K-1] (clip frames, 4t+1), `num_shots`, `source` (video path), `attributes` (JSON per-shot
ground truth or "").
Bad lines and videos are skipped with a warning naming the file; `build_report.json` in `out_dir`
holds the counts per reason and every skipped file. A manifest without one usable film is a
BuildError naming it and the counts, and a failed build leaves nothing it wrote behind. TFDS
writes ArrayRecord without TensorFlow.

Storage (`config.data.storage`, a build setting: `--config.data.storage=mp4` on `data build` or
`data synthetic`):
- "frames" (default): `video` uint8 [T, H, W, 3], zlib-compressed raw pixels. Lossless and
  cheap to read (inflate), but T*H*W*3 bytes per clip before zlib (39 MiB at 33x480x832).
- "mp4": `video` the bytes of an H.264 mp4 holding exactly the clip's T frames of H x W at
  config.video.fps, re-encoded after crop/resize/resample with x264 at config.data.mp4_crf.
  Smaller: on the synthetic world's flat colours 5x (33x64x64) to 17x (33x480x832: 46 KiB, raw
  39 MiB) below zlib frames, far more on real footage, which zlib barely compresses. Lossy: at
  crf 18 the synthetic world decodes 1.9 levels off on average, up to ~65 at sharp colour edges
  (chroma is 4:2:0). Decoding costs CPU (~40 ms a 33x480x832 clip on one core), which the
  pipeline does in its workers or read threads (data/pipeline.py).
"frames" stays the default: "mp4" trades exact pixels and decode CPU for size, better for big
clips and real footage but not on every count. A reader never needs the setting: the dataset's feature spec says which (`dataset_storage`:
a uint8 tensor or a bytes scalar), and `clip_frames` turns either into uint8 [T, H, W, 3].
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import sys
import time

import numpy as np
import tensorflow_datasets as tfds

from holocine_jax import files, world
from holocine_jax.data.manifest import ManifestError, clip_cuts, read_manifest
from holocine_jax.data.video import (VideoError, decode_mp4, encode_mp4, probe_video,
                                     read_video, write_video)

log = logging.getLogger(__name__)
REPORT = "build_report.json"
PROGRESS_SECONDS = 10.0   # `data build` prints its counts at most this often (and at the end)
STORAGES = ("frames", "mp4")


def _video_feature(storage: str):
    if storage == "frames":
        return tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.ZLIB)
    if storage == "mp4":
        return tfds.features.Tensor(shape=(), dtype=np.object_, doc="H.264 mp4 of the clip")
    raise ValueError(f"config.data.storage must be one of {STORAGES}, got {storage!r}")


class BuildError(ValueError):
    """A skip turned into an error by `strict=True`, or a manifest without one usable film."""


class HolocineClips(tfds.core.GeneratorBasedBuilder):
    """Clips + hierarchical captions + cuts; `skipped` counts bad inputs per reason."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, manifest: str = "", video=None, max_shots: int = 13,
                 strict: bool = False, progress: bool = False, storage: str = "frames",
                 mp4_crf: int = 18, **kwargs):
        self._manifest, self._video, self._max_shots, self._strict = manifest, video, max_shots, strict
        self._progress, self._storage, self._mp4_crf = progress, storage, mp4_crf
        self.skipped: collections.Counter = collections.Counter()
        self.skipped_files: list[dict] = []
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "video": _video_feature(self._storage),
            "global_caption": tfds.features.Text(),
            "shot_captions": tfds.features.Sequence(tfds.features.Text()),
            "cut_frames": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "num_shots": tfds.features.Scalar(dtype=np.int32),
            "source": tfds.features.Text(),
            "attributes": tfds.features.Text(),
        }), description="HoloCine multi-shot clips (DESIGN §9).")

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        total = _count_films(self._manifest)
        kept, start, shown = 0, time.perf_counter(), -math.inf
        for done, item in enumerate(read_manifest(self._manifest), start=1):
            try:
                if isinstance(item, ManifestError):
                    raise item
                example = self._example(item)
                kept += 1
                yield item.line, example
            except (ManifestError, VideoError) as e:
                self._skip(e)
            now = time.perf_counter()
            if self._progress and (now - shown >= PROGRESS_SECONDS or done == total):
                shown = now
                print(f"data build: {done}/{total} films read, {kept} kept, "
                      f"{sum(self.skipped.values())} skipped ({done / (now - start):.2f} films/s)",
                      file=sys.stderr, flush=True)
        if not kept:
            raise BuildError(f"no usable film in manifest {self._manifest!r}: {total} film line(s), "
                             f"skipped {dict(sorted(self.skipped.items())) or 'none'} (each is "
                             f"logged above with its file)")

    def _example(self, record) -> dict:
        v = self._video
        info = probe_video(record.video)
        cuts, num_shots = clip_cuts(record, info.num_frames, info.fps, v.fps, v.num_frames,
                                    self._max_shots)
        frames = read_video(record.video, num_frames=v.num_frames, fps=v.fps,
                            size=(v.height, v.width))
        if self._storage == "mp4":
            frames = encode_mp4(frames, fps=v.fps, crf=self._mp4_crf)
        return dict(video=frames, global_caption=record.global_caption,
                    shot_captions=list(record.shot_captions[:num_shots]),
                    cut_frames=np.asarray(cuts, np.int32), num_shots=num_shots,
                    source=record.video, attributes=record.attributes)

    def _skip(self, e: ManifestError | VideoError) -> None:
        line = getattr(e, "line", None)
        entry = dict(reason=e.reason, path=e.path, line=line, detail=e.detail)
        if self._strict:
            raise BuildError(f"--strict: {e}")
        log.warning("skipping %s", e)
        self.skipped[e.reason] += 1
        self.skipped_files.append(entry)


def _count_films(manifest: str) -> int:
    """Non-blank lines of a manifest (what `read_manifest` yields)."""
    with open(manifest, encoding="utf-8", errors="replace") as f:
        return sum(1 for text in f if text.strip())


def build_dataset(manifest: str, out_dir: str, config, *, strict: bool = False,
                  progress: bool = True) -> dict:
    """See `_build_dataset`; a gs:// `out_dir` is built locally and uploaded when complete (its
    dataset_info.json and build report last)."""
    if not files.is_gcs(out_dir):
        return _build_dataset(manifest, out_dir, config, strict=strict, progress=progress)
    with files.staged_directory(out_dir) as local:
        report = _build_dataset(manifest, local, config, strict=strict, progress=progress)
        return _published(report, local, out_dir)


def _published(report: dict, local: str, out_dir: str) -> dict:
    """The build report of a staged build, naming where it is published; rewritten in `local`."""
    report = dict(report, data_dir=files.resolve(out_dir) + report["data_dir"][len(local):])
    with open(os.path.join(local, REPORT), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _build_dataset(manifest: str, out_dir: str, config, *, strict: bool = False,
                   progress: bool = True) -> dict:
    """Build the TFDS dataset of `manifest` under out_dir; returns (and writes) the report:
    {"examples": n, "skipped": {reason: count}, "skipped_files": [...], "data_dir": ...}.

    progress: a stderr line every PROGRESS_SECONDS (and at the end) with films read / kept /
    skipped. A failed build (BuildError: a --strict skip, or no usable film) removes what it
    wrote: `out_dir` itself when the build created it.
    """
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest {manifest!r} does not exist")
    created = [p for p in (out_dir, os.path.join(out_dir, "holocine_clips"),
                           os.path.join(out_dir, "downloads")) if not os.path.exists(p)]
    storage = config.data.storage
    _video_feature(storage)  # a bad storage name fails before anything is written
    builder = HolocineClips(manifest=manifest, video=config.video, max_shots=config.shots.max_shots,
                            strict=strict, progress=progress, storage=storage,
                            mp4_crf=int(config.data.mp4_crf), data_dir=out_dir,
                            file_format="array_record")
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD))
    except BaseException:
        for path in created:   # outermost first: nothing this build made is left behind
            shutil.rmtree(path, ignore_errors=True)
        raise
    report = dict(examples=int(builder.info.splits["train"].num_examples),
                  skipped=dict(sorted(builder.skipped.items())),
                  skipped_files=builder.skipped_files, data_dir=str(builder.data_dir))
    with open(os.path.join(out_dir, REPORT), "w") as f:
        json.dump(report, f, indent=1)
    log.info("built %d examples, skipped %s", report["examples"], report["skipped"])
    return report


def dataset_dir(out_dir: str) -> str:
    """The versioned TFDS directory inside a build's out_dir."""
    path = os.path.join(out_dir, "holocine_clips", str(HolocineClips.VERSION))
    if not files.exists(os.path.join(path, "dataset_info.json")):
        raise FileNotFoundError(f"no built dataset under {out_dir!r} (expected {path})")
    return path


def load_data_source(out_dir: str, split: str = "train"):
    """Random-access source (len, [i]) over the ArrayRecord shards; no builder class needed.
    A record's `video` is as stored (`clip_frames` gives the frames of either storage)."""
    local = files.local_copy(dataset_dir(out_dir))   # ArrayRecord reads local files (gs://: a mirror)
    return tfds.builder_from_directory(local).as_data_source(split=split)


def dataset_storage(out_dir: str) -> str:
    """"frames" or "mp4": how a built dataset stores its clips, read from its feature spec
    (datasets built before the option existed are "frames")."""
    feature = tfds.builder_from_directory(dataset_dir(out_dir)).info.features["video"]
    if feature.np_dtype == np.uint8:
        return "frames"
    if feature.np_dtype == np.object_ and feature.shape == ():
        return "mp4"
    raise ValueError(f"{out_dir!r}: unknown video feature {feature!r}")


def clip_frames(video, storage: str, *, threads: int = 1, name: str = "<bytes>",
                alloc=np.empty) -> np.ndarray:
    """A record's `video` as uint8 [T, H, W, 3]: the stored frames, or the mp4 bytes decoded in
    memory into `alloc(shape, dtype)` with `threads` FFmpeg threads (`video.decode_mp4`;
    VideoError naming `name` when they do not decode)."""
    if storage == "mp4":
        return decode_mp4(video, threads=threads, name=name, alloc=alloc)
    return np.asarray(video)


def decode_text(example: dict) -> dict:
    """bytes -> str for the text features of an example read without TensorFlow."""
    out = dict(example)
    for key in ("global_caption", "source", "attributes"):
        if isinstance(out.get(key), bytes):
            out[key] = out[key].decode("utf-8")
    out["shot_captions"] = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
                            for c in example["shot_captions"]]
    return out


def write_synthetic_dataset(out_dir: str, num_films: int, seed: int, config, *,
                            strict: bool = True) -> dict:
    """Render `num_films` films of the synthetic world as mp4 + manifest.jsonl in out_dir and
    build them like any manifest (attributes = the FilmSpec as JSON). Film i uses seed
    seed * 1_000_000 + i; shots per film in [2, min(5, config.shots.max_shots)]. A gs://
    `out_dir` is written locally and uploaded when complete."""
    if files.is_gcs(out_dir):
        with files.staged_directory(out_dir) as local:
            report = write_synthetic_dataset(local, num_films, seed, config, strict=strict)
            return _published(report, local, out_dir)
    v = config.video
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    manifest = os.path.join(out_dir, "manifest.jsonl")
    hi = min(world.MAX_SHOTS, config.shots.max_shots)
    with open(manifest, "w") as f:
        for i in range(num_films):
            frames, spec = world.make_film(seed * 1_000_000 + i, height=v.height, width=v.width,
                                           num_frames=v.num_frames, shot_range=(2, hi))
            name = f"videos/film_{i:06d}.mp4"
            write_video(os.path.join(out_dir, name), frames, fps=v.fps)
            shots = [dict(caption=s.caption, start=s.start) for s in spec.shots]
            f.write(json.dumps(dict(video=name, global_caption=spec.global_caption, shots=shots,
                                    attributes=spec.to_dict())) + "\n")
    return build_dataset(manifest, out_dir, config, strict=strict)
