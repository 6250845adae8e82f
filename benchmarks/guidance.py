"""Classifier-free guidance on the toy world: does caption dropout give guidance something to
work with? (issue 19)

1. Trains the tiny config (caption dropout `--dropout`, default the config's 0.1) on the demo's
   synthetic data (`demo.build_data`, `train_on_dataset`; a rerun with the same workdir resumes).
2. Samples `--films` held-out films (`held_out_film`, seeds HELD_OUT_SEED + k) at each
   `--scales` value with the same seeds and noise, scores them with the world's exact metrics
   (`eval.job.score_films`), and prints one table row per scale plus 95% bootstrap intervals
   (over films) of each metric's change from the first scale.

    python benchmarks/guidance.py [--train-steps 1500] [--films 16] [--scales 1,3]
        [--out benchmarks/results/guidance.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from holocine_jax.checkpoint import load_params
from holocine_jax.config import load_config
from holocine_jax.demo import build_data
from holocine_jax.eval.job import score_films
from holocine_jax.sample.run import generate, text_stack
from holocine_jax.train.run import train_on_dataset
from holocine_jax.train.validation import HELD_OUT_SEED, held_out_film
from holocine_jax.vae import make_vae

SHOWN = ("text_alignment", "framing_accuracy", "glass_accuracy", "identity_consistency",
         "room_consistency", "cut_exact")


def log(msg: str):
    print(f"guidance: {msg}", flush=True)


def per_film_scores(config, clips, films, truths) -> list[dict]:
    return [score_films(config, [c], [f], [t]) for c, f, t in zip(clips, films, truths)]


def bootstrap_gap(a, b, *, draws=2000, seed=0):
    """Mean of b - a over films (pairs with both defined) and its 95% percentile interval."""
    pairs = np.array([(x, y) for x, y in zip(a, b) if x is not None and y is not None], float)
    if len(pairs) == 0:
        return None
    d = pairs[:, 1] - pairs[:, 0]
    idx = np.random.default_rng(seed).integers(0, len(d), (draws, len(d)))
    means = d[idx].mean(axis=1)
    return dict(mean=float(d.mean()), lo=float(np.percentile(means, 2.5)),
                hi=float(np.percentile(means, 97.5)), films=len(d))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--train-films", type=int, default=64)
    p.add_argument("--dropout", type=float, help="train.caption_dropout (default: the config's)")
    p.add_argument("--films", type=int, default=16)
    p.add_argument("--scales", default="1,3")
    p.add_argument("--workdir", default="/tmp/holocine-guidance-bench")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "guidance.json"))
    args = p.parse_args(argv)
    config = load_config("tiny")
    config.train.steps = args.train_steps
    config.train.validate_every = 0
    if args.dropout is not None:
        config.train.caption_dropout = args.dropout
    scales = [float(s) for s in args.scales.split(",")]
    tokenizer, encoder = text_stack(config)
    vae = make_vae(config)
    data = build_data(config, os.path.join(args.workdir, "data"), args.train_films)
    log(f"training {args.train_steps} steps, caption dropout {config.train.caption_dropout}")
    start = time.perf_counter()
    summary = train_on_dataset(config, data, os.path.join(args.workdir, "train"),
                               tokenizer=tokenizer, text_encoder=encoder, vae=vae)
    train_s = time.perf_counter() - start
    model = load_params(summary["checkpoint_dir"], config)
    held_out = [held_out_film(config, HELD_OUT_SEED + k) for k in range(args.films)]
    films, truths = [f for f, _ in held_out], [s.shot_attributes() for _, s in held_out]
    rows = {}
    for scale in scales:
        cfg = config.copy_and_resolve_references()
        cfg.sample.guidance_scale = scale
        cfg.sample.batch_size = args.films
        log(f"sampling {args.films} films at guidance {scale:g}")
        clips = [None] * args.films
        t0 = time.perf_counter()
        for i, _, clip, _ in generate(cfg, [model], tokenizer, encoder, vae, films, progress=False):
            clips[i] = clip
        rows[scale] = dict(seconds=time.perf_counter() - t0,
                           films=per_film_scores(cfg, clips, films, truths),
                           mean=score_films(cfg, clips, films, truths))
    base = scales[0]
    gaps = {s: {m: bootstrap_gap([f.get(m) for f in rows[base]["films"]],
                                 [f.get(m) for f in rows[s]["films"]]) for m in SHOWN}
            for s in scales[1:]}
    print(f"\ntiny, {summary['step']} steps, caption dropout {config.train.caption_dropout}, "
          f"final loss {summary['loss']:.3f}, {args.films} held-out films")
    print("| guidance | " + " | ".join(SHOWN) + " | s/batch |")
    print("|---" * (len(SHOWN) + 2) + "|")
    for s in scales:
        m = rows[s]["mean"]
        print(f"| {s:g} | " + " | ".join("-" if m.get(k) is None else f"{m[k]:.3f}" for k in SHOWN)
              + f" | {rows[s]['seconds']:.1f} |")
    for s, g in gaps.items():
        print(f"\nguidance {s:g} - {base:g}, 95% bootstrap intervals over films:")
        for k, v in g.items():
            if v is not None:
                print(f"  {k}: {v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] ({v['films']} films)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(train_steps=summary["step"], caption_dropout=config.train.caption_dropout,
                       final_loss=summary["loss"], train_seconds=train_s, films=args.films,
                       rows={str(s): r for s, r in rows.items()},
                       gaps={str(s): g for s, g in gaps.items()}), f, indent=2)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
