"""What a sampled film leaves on disk: film.mp4, contact_sheet.png (a row per shot), film.json.

The contact sheet shows `columns` frames per shot, evenly spaced from the shot's first to its last
frame; the first frame of every shot after the first (the cut frame) gets a red border, and every
row starts at the shot's first frame, so a glance shows where the cuts fell.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from holocine_jax.data.video import write_video
from holocine_jax.shots import shot_bounds

CUT_MARK = (230, 30, 30)
GAP = 2  # pixels between thumbnails and rows


def to_uint8(video) -> np.ndarray:
    """Video in [-1, 1] (any float array) -> uint8 [.., 3] with round-to-nearest."""
    v = np.clip((np.asarray(video, np.float32) + 1.0) * 127.5, 0.0, 255.0)
    return np.round(v).astype(np.uint8)


def contact_sheet(frames: np.ndarray, cut_frames, *, columns: int = 6, border: int = 2) -> np.ndarray:
    """uint8 [rows*(H+2b)+gaps, columns*(W+2b)+gaps, 3]: a row per shot, cut frames outlined."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    cuts = {int(c) for c in cut_frames}
    shots = shot_bounds(t, cut_frames)
    ch, cw = h + 2 * border, w + 2 * border
    sheet = np.full((len(shots) * (ch + GAP) - GAP, columns * (cw + GAP) - GAP, 3), 255, np.uint8)
    for row, (start, end) in enumerate(shots):
        picks = np.unique(np.linspace(start, end - 1, min(columns, end - start)).round().astype(int))
        for col, f in enumerate(picks):
            y, x = row * (ch + GAP), col * (cw + GAP)
            if f in cuts:
                sheet[y:y + ch, x:x + cw] = CUT_MARK
            sheet[y + border:y + border + h, x + border:x + border + w] = frames[f]
    return sheet


def write_film(out_dir: str, frames: np.ndarray, *, fps: float, cut_frames, metadata: dict,
               columns: int = 6) -> dict:
    """Write film.mp4, contact_sheet.png and film.json (metadata + cuts + fps) into out_dir.

    frames: uint8 [T, H, W, 3]; cut_frames: the applied pixel cuts (film.json `cut_frames`; the
    sampler's metadata adds the `requested_cuts`). Returns {"mp4", "contact_sheet", "json"} paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, name) for k, name in
             (("mp4", "film.mp4"), ("contact_sheet", "contact_sheet.png"), ("json", "film.json"))}
    sheet = contact_sheet(frames, cut_frames, columns=columns)
    write_video(paths["mp4"], frames, fps=fps)
    Image.fromarray(sheet).save(paths["contact_sheet"])
    info = dict(metadata, cut_frames=[int(c) for c in cut_frames], num_frames=int(len(frames)),
                height=int(frames.shape[1]), width=int(frames.shape[2]), fps=float(fps))
    with open(paths["json"], "w") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)
    return paths
