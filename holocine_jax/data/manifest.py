"""JSONL film manifests (DESIGN §9): parsing, validation, and cut mapping onto training clips.

One film per line, paths relative to the manifest's folder:

    {"video": "a.mp4", "global_caption": "...", "shots": [{"caption": "...", "start": 0}, ...]}
    {"video": "b.mp4", "global_caption": "...", "shot_captions": ["...", "..."], "cuts": [37]}

`start`/`cuts` are source frames of the video. Optional keys: `num_shots` (must match the shots),
`attributes` (per-shot ground truth, kept as JSON). A bad line raises `ManifestError` naming the
line, the video and a `reason` in MANIFEST_REASONS, which the build counts.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

import numpy as np

from holocine_jax.shots import snap_4t_plus_1

MANIFEST_REASONS = ("invalid_json", "bad_schema", "caption_count_mismatch", "bad_cuts",
                    "cuts_out_of_range", "too_many_shots")


class ManifestError(Exception):
    """A manifest line that cannot become an example (`line` is 1-based)."""

    def __init__(self, line: int, reason: str, detail: str, path: str = ""):
        self.line, self.reason, self.detail, self.path = line, reason, detail, path
        where = f"line {line}" + (f" ({path})" if path else "")
        super().__init__(f"{where}: {reason}: {detail}")


@dataclasses.dataclass(frozen=True)
class FilmRecord:
    """A validated manifest line; `cut_frames` are source frames starting shots 2..K."""
    line: int
    video: str
    global_caption: str
    shot_captions: tuple[str, ...]
    cut_frames: tuple[int, ...]
    attributes: str = ""  # JSON text of per-shot ground truth, "" when unknown


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_line(text: str, line: int, root: str = "") -> FilmRecord:
    """Validate one JSONL line; relative video paths are resolved against `root`."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(line, "invalid_json", str(e)) from None
    if not isinstance(d, dict):
        raise ManifestError(line, "bad_schema", f"expected a JSON object, got {type(d).__name__}")
    video = d.get("video")
    if not isinstance(video, str) or not video:
        raise ManifestError(line, "bad_schema", "'video' must be a non-empty string")
    path = video if os.path.isabs(video) else os.path.join(root, video)
    err = lambda reason, detail: ManifestError(line, reason, detail, path)  # noqa: E731
    if not isinstance(d.get("global_caption"), str):
        raise err("bad_schema", "'global_caption' must be a string")
    if "shots" in d:
        shots = d["shots"]
        if not isinstance(shots, list) or not shots or not all(isinstance(s, dict) for s in shots):
            raise err("bad_schema", "'shots' must be a non-empty list of objects")
        captions = [s.get("caption") for s in shots]
        starts = [s.get("start", 0 if i == 0 else None) for i, s in enumerate(shots)]
        if not all(_is_int(s) for s in starts):
            raise err("bad_schema", f"every shot needs an integer 'start', got {starts}")
        if starts[0] != 0:
            raise err("bad_cuts", f"the first shot must start at frame 0, got {starts[0]}")
        cuts = starts[1:]
    elif "shot_captions" in d:
        captions, cuts = d["shot_captions"], d.get("cuts", [])
        if not isinstance(captions, list) or not isinstance(cuts, list) or not captions:
            raise err("bad_schema", "'shot_captions' and 'cuts' must be lists")
        if not all(_is_int(c) for c in cuts):
            raise err("bad_schema", f"'cuts' must be integers, got {cuts}")
        if len(captions) != len(cuts) + 1:
            raise err("caption_count_mismatch",
                      f"{len(captions)} shot captions for {len(cuts) + 1} shots ({len(cuts)} cuts)")
    else:
        raise err("bad_schema", "needs 'shots' (or 'shot_captions' with 'cuts')")
    if not all(isinstance(c, str) for c in captions):
        raise err("bad_schema", "every shot caption must be a string")
    if "num_shots" in d and d["num_shots"] != len(captions):
        raise err("caption_count_mismatch",
                  f"num_shots={d['num_shots']} but {len(captions)} shot captions")
    bounds = [0] + list(cuts)
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise err("bad_cuts", f"cuts must be positive and strictly increasing, got {cuts}")
    attributes = d.get("attributes")
    return FilmRecord(line, path, d["global_caption"], tuple(captions), tuple(cuts),
                      json.dumps(attributes) if attributes is not None else "")


def read_manifest(path: str) -> Iterator[FilmRecord | ManifestError]:
    """Every non-blank line of the manifest as a FilmRecord or the ManifestError it raised."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest {path!r} does not exist")
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield parse_line(text, i, root)
            except ManifestError as e:
                yield e


def clip_cuts(record: FilmRecord, source_frames: int, src_fps: float, fps: float,
              num_frames: int, max_shots: int) -> tuple[tuple[int, ...], int]:
    """Map a film's source cuts onto a clip of `num_frames` frames at `fps` from frame 0.

    Returns (cut_frames in clip frames, snapped to the 4t+1 grid, num_shots kept): shots that
    start at or after the clip's end are dropped. Raises ManifestError `cuts_out_of_range` for a
    cut past the video's end or shots that collapse on the grid, `too_many_shots` above max_shots.
    """
    err = lambda reason, detail: ManifestError(record.line, reason, detail, record.video)  # noqa: E731
    if record.cut_frames and record.cut_frames[-1] >= source_frames:
        raise err("cuts_out_of_range",
                  f"cut at frame {record.cut_frames[-1]} but the video has {source_frames} frames")
    step = src_fps / fps
    snapped = []
    for c in record.cut_frames:
        k = int(np.ceil(c / step - 1e-6))             # first clip frame showing source frame >= c
        p = snap_4t_plus_1(k)                         # nearest Wan cut frame 4t+1
        if p >= num_frames:
            break
        snapped.append(max(p, 1))
    bounds = [0] + snapped
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise err("cuts_out_of_range", f"cuts {list(record.cut_frames)} collapse to {snapped} on "
                  f"the 4t+1 grid of {num_frames} frames at {fps} fps")
    if len(bounds) > max_shots:
        raise err("too_many_shots", f"{len(bounds)} shots in the clip, max_shots={max_shots}")
    return tuple(snapped), len(bounds)
