"""Film metrics as the HoloCine paper defines them (DESIGN §12), as clu collections.

    values = film_values(frames, requested_cuts, scorers=scorers, global_caption=g, captions=c)
    total = FilmMetrics.from_values(values) if total is None else total.merge(...)
    total.compute()  # {"shot_cut_accuracy": ..., "subject_consistency": ..., ...}

Per film (frames uint8 [T, H, W, 3], requested cuts = the first pixel frame of shots 2..K):
- shot_cut_accuracy (Table 1's SCA) = exp(-NSD), NSD = (sum of matched frame deviations +
  penalty * (missed + extra cuts)) / T, detected and requested cuts matched one to one so that
  NSD is smallest (`match_cost`); the paper leaves the penalty open: `SCA_PENALTY` frames
  (config.eval.sca_penalty). cut_precision / cut_recall / cut_exact: matches within
  +- tolerance frames, beside it. Cuts come from `scorers.cuts` (TransNetV2 or the
  frame-difference detector; the job records which).
- subject_consistency / background_consistency: VBench's formula on the DINO / CLIP image
  embeddings of each *detected* shot: frame t >= 1 scores (max(0, cos(e_t-1, e_t)) +
  max(0, cos(e_0, e_t))) / 2; the values are per frame, so the average is VBench's
  sim / cnt.
- inter_shot_consistency: cosine of the shots' mean unit CLIP embeddings (requested shots) for
  the shot pairs that share a character tag (`prompts.tagged_shot_pairs`; all pairs when no
  caption has one); CLIP stands in for the paper's ViCLIP.
- semantic_global / semantic_shot: cosine of the CLIP text embedding of the global caption with
  the film's mean unit image embedding, and of each shot caption with its shot's (CLIP for
  ViCLIP again).
- aesthetic_quality: VBench's: mean over frames of the LAION head's score on unit CLIP ViT-L/14
  embeddings, / 10.
- synthetic world, exact: text_alignment (the caption's facts the pixels show),
  identity / room consistency (shot k reads the same colour, pattern, shape / room as shot 1)
  and the accuracy of the read entry side, glass state, framing and shape against the spec.
"""

import dataclasses
import math
from typing import Callable

import flax
import jax.numpy as jnp
import numpy as np
from clu import metrics

from holocine_jax.data.cuts import detect_cuts
from holocine_jax.prompts import tagged_shot_pairs
from holocine_jax.shots import shot_bounds
from holocine_jax.world import caption_facts, read_film, read_shot

SCA_PENALTY = 16.0   # frames charged per missed or extra cut: one second at Wan's 16 fps
# Table 1 of the paper, in its column order: (group, column, metric).
TABLE1 = (("Transition Control", "SCA", "shot_cut_accuracy"),
          ("Inter-shot Consistency", "", "inter_shot_consistency"),
          ("Intra-shot Consistency", "Subject", "subject_consistency"),
          ("Intra-shot Consistency", "Background", "background_consistency"),
          ("Aesthetic", "", "aesthetic_quality"),
          ("Semantic Consistency", "Global", "semantic_global"),
          ("Semantic Consistency", "Shot", "semantic_shot"))
METRIC_NAMES = tuple(m for _, _, m in TABLE1) + (
    "cut_precision", "cut_recall", "cut_exact", "text_alignment", "identity_consistency",
    "room_consistency", "entry_side_accuracy", "glass_accuracy", "framing_accuracy",
    "shape_accuracy")
IDENTITY = ("colour", "pattern", "shape")


@flax.struct.dataclass
class FilmMetrics(metrics.Collection):
    """Averages over films, shots, shot pairs or frames (see the module docstring); NaN when
    nothing was measured."""
    shot_cut_accuracy: metrics.Average
    inter_shot_consistency: metrics.Average
    subject_consistency: metrics.Average
    background_consistency: metrics.Average
    aesthetic_quality: metrics.Average
    semantic_global: metrics.Average
    semantic_shot: metrics.Average
    cut_precision: metrics.Average
    cut_recall: metrics.Average
    cut_exact: metrics.Average
    text_alignment: metrics.Average
    identity_consistency: metrics.Average
    room_consistency: metrics.Average
    entry_side_accuracy: metrics.Average
    glass_accuracy: metrics.Average
    framing_accuracy: metrics.Average
    shape_accuracy: metrics.Average

    @classmethod
    def from_values(cls, values: dict) -> "FilmMetrics":
        """values: metric name -> list of per-film / per-shot numbers (missing names: none)."""
        unknown = set(values) - set(METRIC_NAMES)
        if unknown:
            raise KeyError(f"unknown metrics {sorted(unknown)}")
        fields = {name: metrics.Average.from_model_output(jnp.asarray(v, jnp.float32))
                  for name, v in values.items() if len(v)}
        return cls.empty().replace(**fields)  # (clu annotations must stay real types here)


def match_cost(detected, requested, penalty: float) -> float:
    """Smallest sum of |detected - requested| over a one-to-one matching plus `penalty` per
    cut left unmatched on either side (dynamic programme over the sorted cuts: an optimal
    1-D matching never crosses)."""
    d, r = sorted(int(x) for x in detected), sorted(int(x) for x in requested)
    row = [penalty * j for j in range(len(d) + 1)]       # cost with no requested cut used
    for i, ri in enumerate(r, 1):
        prev, row = row, [penalty * i] + [0.0] * len(d)
        for j, dj in enumerate(d, 1):
            row[j] = min(prev[j] + penalty, row[j - 1] + penalty, prev[j - 1] + abs(ri - dj))
    return float(row[-1])


def shot_cut_accuracy(detected, requested, num_frames: int, *,
                      penalty: float = SCA_PENALTY) -> float:
    """SCA = exp(-NSD), NSD = match_cost(detected, requested, penalty) / num_frames."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return math.exp(-match_cost(detected, requested, penalty) / num_frames)


def match_cuts(detected, requested, tolerance: int) -> int:
    """Number of requested cuts matched one to one by a detected cut within ± tolerance."""
    free = sorted(int(d) for d in detected)
    matched = 0
    for r in sorted(int(c) for c in requested):
        near = [d for d in free if abs(d - r) <= tolerance]
        if near:
            free.remove(min(near, key=lambda d: abs(d - r)))
            matched += 1
    return matched


def cut_scores(detected, requested, tolerance: int) -> dict:
    """{"cut_precision", "cut_recall", "cut_exact"} of one film (1.0 when both are empty)."""
    m = match_cuts(detected, requested, tolerance)
    precision = m / len(detected) if detected else float(not requested)
    recall = m / len(requested) if requested else float(not detected)
    exact = float(m == len(requested) == len(detected))
    return dict(cut_precision=precision, cut_recall=recall, cut_exact=exact)


def simple_embedder(frames: np.ndarray) -> np.ndarray:
    """The built-in image embedder: 8x8 block means of RGB around grey, [N, H, W, 3] -> [N, 192]."""
    x = np.asarray(frames, np.float32) / 255.0 - 0.5
    n, h, w, c = x.shape
    hs, ws = np.linspace(0, h, 9).astype(int), np.linspace(0, w, 9).astype(int)
    cells = [x[:, hs[i]:hs[i + 1], ws[j]:ws[j + 1]].mean(axis=(1, 2))
             for i in range(8) for j in range(8)]
    return np.stack(cells, axis=1).reshape(n, -1)


def _unit(e):
    e = np.asarray(e, np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def vbench_consistency(embeddings) -> list[float]:
    """VBench subject/background consistency terms of one shot: embeddings [N, D] -> N - 1
    values (max(0, cos(e_t-1, e_t)) + max(0, cos(e_0, e_t))) / 2 for t = 1..N-1."""
    e = _unit(embeddings)
    previous = np.maximum(0.0, np.sum(e[1:] * e[:-1], axis=-1))
    first = np.maximum(0.0, e[1:] @ e[0])
    return [float(v) for v in (previous + first) / 2]


def shot_means(embeddings, bounds) -> np.ndarray:
    """[K, D] unit mean of the unit embeddings [T, D] over each shot's frames [a, b)."""
    e = _unit(embeddings)
    return _unit(np.stack([e[a:b].mean(axis=0) for a, b in bounds]))


def world_text_alignment(frames: np.ndarray, caption: str) -> float:
    """Share of the caption's facts that the shot's pixels show (NaN: nothing checkable)."""
    facts, seen = caption_facts(caption), read_shot(frames)
    checked = [seen[k] == v for k, v in facts.items() if seen.get(k) is not None]
    return float(np.mean(checked)) if checked else float("nan")


def world_attribute_values(shots: list[dict], truth: list[dict]) -> dict:
    """Per-shot 0/1 values of the synthetic-world metrics from read shots and the spec's shots."""
    if len(shots) != len(truth):
        raise ValueError(f"{len(shots)} read shots for {len(truth)} shots in the spec")
    out = {k: [] for k in ("identity_consistency", "room_consistency", "entry_side_accuracy",
                           "glass_accuracy", "framing_accuracy", "shape_accuracy")}
    first = shots[0]
    for read in shots[1:]:
        same = [read[a] == first[a] for a in IDENTITY if None not in (read[a], first[a])]
        if same:
            out["identity_consistency"].append(float(all(same)))
        if None not in (read["room"], first["room"]):
            out["room_consistency"].append(float(read["room"] == first["room"]))
    for read, want in zip(shots, truth):
        for key, name in (("entry_side", "entry_side_accuracy"), ("glass", "glass_accuracy"),
                          ("framing", "framing_accuracy"), ("shape", "shape_accuracy")):
            if read[key] is not None:
                out[name].append(float(read[key] == want[key]))
    return out


@dataclasses.dataclass(frozen=True)
class Scorers:
    """What `film_values` measures with (built from a config by `eval/scorers.py`); a None
    scorer leaves its metrics unmeasured.

    cuts: frames [T, H, W, 3] uint8 -> detected cut frames; subject: frames -> [T, D] (DINO);
    clip: frames -> [T, P] (CLIP image tower: background, inter-shot, semantic); clip_text:
    list of captions -> [K, P] (the same CLIP's text tower); aesthetic: frames -> [T] LAION
    scores; text_alignment: (shot frames, caption) -> score in [0, 1] or NaN. `names` says
    what each one is (recorded beside the metrics).
    """
    cuts: Callable = detect_cuts
    subject: Callable | None = simple_embedder
    clip: Callable | None = simple_embedder
    clip_text: Callable | None = None
    aesthetic: Callable | None = None
    text_alignment: Callable | None = world_text_alignment
    names: dict = dataclasses.field(default_factory=lambda: dict(
        cuts="frame-difference detector", subject="built-in pixel embedder",
        clip="built-in pixel embedder", text_alignment="synthetic-world caption check"))


def film_values(frames: np.ndarray, requested_cuts, *, scorers: Scorers = Scorers(),
                global_caption: str | None = None, captions=None, truth=None, detected=None,
                tolerance: int = 2, penalty: float = SCA_PENALTY) -> dict[str, list[float]]:
    """Every metric's values for one decoded film (see the module docstring).

    frames: uint8 [T, H, W, 3]; requested_cuts: pixel frames; captions: one per shot;
    truth: `FilmSpec.shot_attributes()` (synthetic world); detected: the film's detected cuts
    when the caller has them (else `scorers.cuts(frames)`).
    """
    num_frames, requested = len(frames), [int(c) for c in requested_cuts]
    bounds = shot_bounds(num_frames, requested)
    if captions is not None and len(captions) != len(bounds):
        raise ValueError(f"{len(captions)} captions for {len(bounds)} shots")
    detected = [int(c) for c in (scorers.cuts(frames) if detected is None else detected)]
    values = {k: [v] for k, v in cut_scores(detected, requested, tolerance).items()}
    values["shot_cut_accuracy"] = [shot_cut_accuracy(detected, requested, num_frames,
                                                     penalty=penalty)]
    found = shot_bounds(num_frames, detected)
    embedded = {}
    for name, key in (("subject_consistency", "subject"), ("background_consistency", "clip")):
        if getattr(scorers, key) is not None:
            same = key == "clip" and scorers.clip is scorers.subject   # the built-in embedder
            e = embedded[key] = embedded["subject"] if same else getattr(scorers, key)(frames)
            values[name] = [v for a, b in found for v in vbench_consistency(e[a:b])]
    if scorers.clip is not None:
        image = embedded["clip"]
        means = shot_means(image, bounds)
        pairs = tagged_shot_pairs(captions) if captions is not None else [
            (k, l) for k in range(len(bounds)) for l in range(k + 1, len(bounds))]
        values["inter_shot_consistency"] = [float(means[k] @ means[l]) for k, l in pairs]
        if scorers.clip_text is not None and captions is not None:
            text = _unit(scorers.clip_text([global_caption or "", *captions]))
            film = shot_means(image, [(0, num_frames)])[0]
            if global_caption:
                values["semantic_global"] = [float(text[0] @ film)]
            values["semantic_shot"] = [float(t @ m) for t, m in zip(text[1:], means)]
    if scorers.aesthetic is not None:
        values["aesthetic_quality"] = [float(np.mean(scorers.aesthetic(frames))) / 10]
    if scorers.text_alignment is not None and captions is not None:
        scores = [scorers.text_alignment(frames[a:b], c) for (a, b), c in zip(bounds, captions)]
        values["text_alignment"] = [s for s in scores if not np.isnan(s)]
    if truth is not None:
        values.update(world_attribute_values(read_film(frames, requested), truth))
    return values


def film_metrics(frames: np.ndarray, requested_cuts, **kwargs) -> FilmMetrics:
    """`FilmMetrics` of one film: `film_values` (same arguments) as a clu collection."""
    return FilmMetrics.from_values(film_values(frames, requested_cuts, **kwargs))


def to_floats(computed: dict) -> dict:
    """clu compute() output -> plain floats (None for metrics with nothing measured)."""
    out = {}
    for k, v in computed.items():
        v = float(v)
        out[k] = None if np.isnan(v) else v
    return out


def table1_markdown(rows: dict, notes=()) -> str:
    """Markdown table in Table 1's column order: rows {label: metrics dict}; "–" where a
    metric was not measured; `notes` become footnote lines."""
    head = [f"{g} {c}".strip() for g, c, _ in TABLE1]
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, m in rows.items():
        cells = ["–" if m.get(k) is None else f"{m[k]:.4f}" for _, _, k in TABLE1]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
