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

from holocine_jax.shots import snap_4t_plus_1, snap_cuts

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


def cuts_field(d: dict, err) -> list[int] | None:
    """The line's optional 'cuts' (first frames of shots 2..K) as a list of ints, or None."""
    cuts = d.get("cuts")
    if cuts is not None and (not isinstance(cuts, list) or not all(_is_int(c) for c in cuts)):
        raise err("bad_schema", f"'cuts' must be a list of integers, got {cuts!r}")
    return cuts


def shot_fields(d: dict, err) -> tuple[list[str], list[int] | None]:
    """(shot captions, cuts) of a JSON line, shared by manifests and `sample --prompt-file`.

    `shots`: a list of caption strings or {"caption": str, "start": int} objects (a start for
    every shot after the first or for none; the first starts at 0), or `shot_captions`: a list of
    strings; the cuts come from the starts or from 'cuts', None when the line gives neither.
    `err(reason, detail)` builds the exception raised (reasons of MANIFEST_REASONS).
    """
    cuts = cuts_field(d, err)
    if "shots" in d:
        shots = d["shots"]
        if not isinstance(shots, list) or not shots or not all(isinstance(s, (dict, str))
                                                               for s in shots):
            raise err("bad_schema", "'shots' must be a non-empty list of objects or strings")
        captions = [s if isinstance(s, str) else s.get("caption") for s in shots]
        starts = [s.get("start") if isinstance(s, dict) else None for s in shots]
        if starts[0] not in (None, 0):
            raise err("bad_cuts", f"the first shot must start at frame 0, got {starts[0]}")
        if any(s is not None for s in starts[1:]):
            if not all(_is_int(s) for s in starts[1:]):
                raise err("bad_schema", f"give every shot after the first an integer 'start' (or "
                          f"none of them), got {starts}")
            if cuts is not None:
                raise err("bad_schema", "give the cuts as the shots' 'start' or as 'cuts', not "
                          "both")
            cuts = starts[1:]
    elif "shot_captions" in d:
        captions = d["shot_captions"]
        if not isinstance(captions, list) or not captions:
            raise err("bad_schema", "'shot_captions' must be a non-empty list")
    else:
        raise err("bad_schema", "needs 'shots' (or 'shot_captions' with 'cuts')")
    if not all(isinstance(c, str) for c in captions):
        raise err("bad_schema", "every shot caption must be a string")
    if cuts is not None and len(captions) != len(cuts) + 1:
        raise err("caption_count_mismatch",
                  f"{len(captions)} shot captions for {len(cuts) + 1} shots ({len(cuts)} cuts)")
    return captions, cuts


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
    captions, cuts = shot_fields(d, err)
    if cuts is None:
        if len(captions) > 1:
            raise err("bad_schema", f"{len(captions)} shots but no cut frames: give every shot "
                      "after the first a 'start' (or give 'cuts')")
        cuts = []
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

    Returns (cut_frames in clip frames as `shots.snap_cuts` applies them: nearest 4t+1, as the
    official scripts, num_shots kept): shots whose cut snaps onto or past the clip's last frame
    are dropped with their captions. Raises ManifestError `cuts_out_of_range` for a cut past the
    video's end or shots that collapse onto one cut, `too_many_shots` above max_shots.
    """
    err = lambda reason, detail: ManifestError(record.line, reason, detail, record.video)  # noqa: E731
    if record.cut_frames and record.cut_frames[-1] >= source_frames:
        raise err("cuts_out_of_range",
                  f"cut at frame {record.cut_frames[-1]} but the video has {source_frames} frames")
    step = src_fps / fps
    clip = [int(np.ceil(c / step - 1e-6)) for c in record.cut_frames]  # first clip frame >= c
    applied = snap_cuts(num_frames, clip)
    inside = sum(snap_4t_plus_1(k) < num_frames for k in clip)  # the cuts the clip keeps
    if len(applied) < inside:
        raise err("cuts_out_of_range", f"cuts {list(record.cut_frames)} collapse to {applied} on "
                  f"the 4t+1 grid of {num_frames} frames at {fps} fps")
    if len(applied) + 1 > max_shots:
        raise err("too_many_shots", f"{len(applied) + 1} shots in the clip, max_shots={max_shots}")
    return tuple(applied), len(applied) + 1
