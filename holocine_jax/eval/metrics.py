"""Film metrics as clu collections (DESIGN §12).

    metrics = film_metrics(frames, requested_cuts, spec=spec, captions=captions, config=config)
    total = metrics if total is None else total.merge(metrics)
    total.compute()  # {"cut_recall": ..., "inter_shot_consistency": ..., ...}

- cut accuracy: cuts found by `data/cuts.py`'s detector vs the requested ones, matched one to one
  within ± `tolerance` frames: precision, recall and the share of films with exactly the requested
  cuts;
- consistency (pluggable image embedder: `frames [N, H, W, 3] uint8 -> [N, D]`): intra-shot
  = mean over frames t >= 1 of (cos(e_0, e_t) + cos(e_{t-1}, e_t)) / 2 (VBench's subject
  consistency), inter-shot = mean cosine between the shots' mean embeddings over all shot pairs;
- text alignment (pluggable: `(frames, caption) -> score in [0, 1]`), the built-in one checks the
  synthetic world's captions (`world.caption_facts`: framing, action -> glass state, shape, entry
  side) against `world.read_shot`;
- synthetic world, exact: `identity` / `room` consistency (shot k reads the same colour, pattern,
  shape / room as shot 1, on the attributes readable in both), and accuracy of the read entry side,
  glass state, framing and shape against the film's spec (captions state all four).
"""
import flax
import jax.numpy as jnp
import numpy as np
from clu import metrics

from holocine_jax.data.cuts import detect_cuts
from holocine_jax.shots import shot_bounds
from holocine_jax.world import caption_facts, read_film, read_shot

METRIC_NAMES = (
    "cut_precision", "cut_recall", "cut_exact", "intra_shot_consistency",
    "inter_shot_consistency", "text_alignment", "identity_consistency", "room_consistency",
    "entry_side_accuracy", "glass_accuracy", "framing_accuracy", "shape_accuracy")
IDENTITY = ("colour", "pattern", "shape")


@flax.struct.dataclass
class FilmMetrics(metrics.Collection):
    """Averages over films (cut scores) or shots (the rest); NaN when nothing was measured."""
    cut_precision: metrics.Average
    cut_recall: metrics.Average
    cut_exact: metrics.Average
    intra_shot_consistency: metrics.Average
    inter_shot_consistency: metrics.Average
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


def consistency(frames: np.ndarray, cut_frames, embed=simple_embedder) -> tuple[list, list]:
    """(intra-shot values, one per shot of >= 2 frames; inter-shot values, one per shot pair)."""
    e = _unit(embed(frames))
    shots = [e[a:b] for a, b in shot_bounds(len(frames), cut_frames)]
    intra = [float(np.mean([(s[0] @ s[t] + s[t - 1] @ s[t]) / 2 for t in range(1, len(s))]))
             for s in shots if len(s) > 1]
    means = _unit(np.stack([s.mean(axis=0) for s in shots]))
    inter = [float(means[k] @ means[l]) for k in range(len(shots)) for l in range(k + 1, len(shots))]
    return intra, inter


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


def film_metrics(frames: np.ndarray, requested_cuts, *, tolerance: int = 2, embed=simple_embedder,
                 captions=None, text_scorer=world_text_alignment, truth=None) -> "FilmMetrics":
    """All metrics of one decoded film. frames: uint8 [T, H, W, 3]; requested_cuts: pixel frames.

    captions: one per shot (text alignment); truth: `FilmSpec.shot_attributes()` (synthetic world).
    """
    values = cut_scores(detect_cuts(frames), list(requested_cuts), tolerance)
    values = {k: [v] for k, v in values.items()}
    values["intra_shot_consistency"], values["inter_shot_consistency"] = consistency(
        frames, requested_cuts, embed)
    bounds = shot_bounds(len(frames), requested_cuts)
    if captions is not None:
        if len(captions) != len(bounds):
            raise ValueError(f"{len(captions)} captions for {len(bounds)} shots")
        scores = [text_scorer(frames[a:b], c) for (a, b), c in zip(bounds, captions)]
        values["text_alignment"] = [s for s in scores if not np.isnan(s)]
    if truth is not None:
        values.update(world_attribute_values(read_film(frames, requested_cuts), truth))
    return FilmMetrics.from_values(values)


def to_floats(computed: dict) -> dict:
    """clu compute() output -> plain floats (None for metrics with nothing measured)."""
    out = {}
    for k, v in computed.items():
        v = float(v)
        out[k] = None if np.isnan(v) else v
    return out
