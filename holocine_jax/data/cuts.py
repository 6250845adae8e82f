"""A frame-difference shot-cut detector (hard cuts), for decoded films and cut-accuracy metrics.

A cut at frame t is a frame whose mean absolute difference to frame t-1 is both above an absolute
floor and `ratio` times the median difference of the film (robust to global motion levels).
TransNet V2 is the paper's detector for real footage; hard cuts in rendered films need no more.
"""
from __future__ import annotations

import numpy as np


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """frames: [T, H, W, C] uint8 -> [T] float32 mean |f[t] - f[t-1]| in [0, 1]; entry 0 is 0."""
    if frames.ndim != 4:
        raise ValueError(f"frames must be [T, H, W, C], got shape {frames.shape}")
    f = frames.astype(np.int16)
    d = np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3)) / 255.0
    return np.concatenate([[0.0], d]).astype(np.float32)


def detect_cuts(frames: np.ndarray, *, min_diff: float = 0.04, ratio: float = 3.0,
                min_gap: int = 2) -> list[int]:
    """Frames that start a new shot (the first frame of shots 2..K), in increasing order.

    frames: [T, H, W, C] uint8. A candidate must exceed `min_diff` and `ratio` x the median
    difference; of candidates closer than `min_gap` frames only the strongest is kept.
    """
    d = frame_differences(frames)
    threshold = max(min_diff, ratio * float(np.median(d[1:])) if len(d) > 1 else min_diff)
    cuts: list[int] = []
    for t in np.flatnonzero(d > threshold):
        if cuts and t - cuts[-1] < min_gap:
            if d[t] > d[cuts[-1]]:
                cuts[-1] = int(t)
            continue
        cuts.append(int(t))
    return cuts
