"""Holistic vs independent shots: does joint generation keep the character consistent? (issue 10)

Trains the tiny model on the synthetic world three times — attention `sparse` (HoloCine),
`full` and `independent` (each shot alone: Wan run shot by shot) — on the same films, steps and
seeds; samples held-out prompts with each; reads the films back with world/reader.py; prints
the metrics per mode and the self-attention FLOPs per mode, and writes
benchmarks/results/consistency.json. The `autoencoder` column reads the held-out ground truth
after the autoencoder's round trip: the ceiling of what a generated film can score. The identity
gap between modes comes with a 95% bootstrap interval over the held-out films.

    python benchmarks/consistency.py      # the tiny config, 2500 steps per mode: ~45 min on 2 cores
    python benchmarks/consistency.py --steps 8000 --config.model.dim=64 --config.model.ffn_dim=128 \
        --config.model.num_layers=2         # a smaller DiT trained longer

Captions never name the colour, pattern or room, so `identity_consistency` / `room_consistency`
(shot k reads like shot 1) can only come from information flowing between shots.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from holocine_jax import prompts, world
from holocine_jax.checkpoint import load_params
from holocine_jax.config import load_config
from holocine_jax.eval.job import score_films
from holocine_jax.eval.metrics import world_attribute_values
from holocine_jax.sample.output import to_uint8
from holocine_jax.sample.run import FilmRequest, encode_texts, film_layout, generate, text_stack
from holocine_jax.shots import ShotLayout
from holocine_jax.train.loop import run_training
from holocine_jax.train.metrics import read_metrics
from holocine_jax.vae import make_vae, normalize_latents

MODES = ("sparse", "full", "independent")
EVAL_SEED = 1_000_000
SHOWN = ("identity_consistency", "room_consistency", "inter_shot_consistency",
         "intra_shot_consistency", "cut_recall", "glass_accuracy", "framing_accuracy",
         "entry_side_accuracy", "text_alignment")


class WorldBatches:
    """Endless shuffled batches of pre-encoded films: latents, text states and layouts."""

    def __init__(self, latents, text_states, layouts, batch: int, seed: int):
        self.latents, self.text, self.layouts = latents, text_states, layouts
        self.batch, self.rng, self.epoch_order, self.pos = batch, np.random.default_rng(seed), [], 0

    def __iter__(self):
        return self

    def __next__(self):
        idx = []
        while len(idx) < self.batch:
            if self.pos == len(self.epoch_order):
                self.epoch_order, self.pos = self.rng.permutation(len(self.latents)), 0
            idx.append(int(self.epoch_order[self.pos]))
            self.pos += 1
        return dict(latents=self.latents[idx], text_states=self.text[idx],
                    layout=ShotLayout.stack([self.layouts[i] for i in idx]),
                    index=np.asarray(idx, np.int64))


def world_films(config, seeds):
    """(FilmRequest, spec) per seed: the film's prompt and cuts, shots capped by max_shots."""
    hi = min(world.MAX_SHOTS, config.shots.max_shots)
    out = []
    for seed in seeds:
        spec = world.sample_film(seed, num_frames=config.video.num_frames, shot_range=(2, hi))
        prompt = prompts.build_prompt(spec.global_caption, spec.shot_captions)
        out.append((FilmRequest(prompt, spec.cut_frames, config.video.num_frames, seed), spec))
    return out


def encode_world(config, films, tokenizer, encoder, vae, chunk: int = 8):
    """Normalised latents [N, F, h, w, z], text states [N, Lt, D] and layouts of the films."""
    v = config.video
    latents, texts, layouts = [], [], []
    encode = jax.jit(vae.encode)
    for start in range(0, len(films), chunk):
        part = films[start:start + chunk]
        video = np.stack([world.render_film(s, height=v.height, width=v.width) for _, s in part])
        z = normalize_latents(encode(jnp.asarray(video, jnp.float32) / 127.5 - 1.0), config)
        latents.append(np.asarray(z))
        texts.append(np.asarray(encode_texts(tokenizer, encoder, [f.prompt for f, _ in part],
                                             config.model.text_len)))
        layouts += [film_layout(config, f, tokenizer) for f, _ in part]
    return np.concatenate(latents), np.concatenate(texts), layouts


def identity_per_film(clips, held_out) -> list[list[float]]:
    """Per held-out film, the 0/1 identity consistency of each scored shot (vs shot 1)."""
    return [world_attribute_values(world.read_film(clip, spec.cut_frames), spec.shot_attributes())
            ["identity_consistency"] for clip, (_, spec) in zip(clips, held_out)]


def bootstrap_gap(a, b, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b) (pooled over scored shots), resampling films (paired)."""
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(draws):
        idx = rng.integers(len(a), size=len(a))
        pa = [v for i in idx for v in a[i]]
        pb = [v for i in idx for v in b[i]]
        if pa and pb:
            gaps.append(np.mean(pa) - np.mean(pb))
    return float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))


def attention_flops(config, layouts, mode: str) -> float:
    """Self-attention matmul FLOPs per film (QK^T and PV over the allowed pairs, all layers)."""
    m = config.model
    pairs = np.mean([float(np.asarray(l.self_attention_mask(mode)).sum()) for l in layouts])
    return 4.0 * pairs * m.dim * m.num_layers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--train-films", type=int, default=256)
    p.add_argument("--eval-films", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG scale; 1 by default: the tiny model trains without caption dropout, "
                        "so an unconditional pass has nothing learned to contrast with")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in --workdir (e.g. to --steps more) instead of restarting")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--workdir", default="/tmp/holocine-consistency")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "consistency.json"))
    args, overrides = p.parse_known_args(argv)
    config = load_config("tiny", overrides)
    config.model.text_len = max(config.model.text_len, 128)  # a 4-shot world prompt needs ~90
    config.train.update(steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                        warmup_steps=min(50, args.steps // 10), log_every=50,
                        checkpoint_every=args.steps, keep_checkpoints=1)
    config.sample.update(num_steps=args.sample_steps, batch_size=args.eval_films,
                         guidance_scale=args.guidance)
    tokenizer, encoder = text_stack(config)
    vae = make_vae(config)
    train = world_films(config, range(args.train_films))
    held_out = world_films(config, range(EVAL_SEED, EVAL_SEED + args.eval_films))
    start = time.perf_counter()
    data = encode_world(config, train, tokenizer, encoder, vae)
    print(f"encoded {len(train)} training films in {time.perf_counter() - start:.1f}s")
    eval_layouts = [film_layout(config, f, tokenizer) for f, _ in held_out]
    truths = [s.shot_attributes() for _, s in held_out]
    # The ceiling: held-out ground truth through the autoencoder, read like a generated film.
    v = config.video
    video = np.stack([world.render_film(s, height=v.height, width=v.width) for _, s in held_out])
    recon = to_uint8(vae.decode(vae.encode(jnp.asarray(video, jnp.float32) / 127.5 - 1.0)))
    rows = {"autoencoder": score_films(config, list(recon), [f for f, _ in held_out], truths)}
    identity = {"autoencoder": identity_per_film(recon, held_out)}
    for mode in args.modes.split(","):
        cfg = config.copy_and_resolve_references()
        cfg.attention.mode = mode
        work = os.path.join(args.workdir, mode)
        if not args.resume:
            shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        summary = run_training(cfg, work, batches=WorldBatches(*data, args.batch, cfg.seed))
        train_s = time.perf_counter() - t0
        model = load_params(summary["checkpoint_dir"], cfg)
        films = [f for f, _ in held_out]
        clips = [None] * len(films)
        for i, _, clip, _ in generate(cfg, [model], tokenizer, encoder, vae, films, progress=False):
            clips[i] = clip
        metrics = score_films(cfg, clips, films, truths)
        identity[mode] = identity_per_film(clips, held_out)
        losses = {k: v["train/loss"] for k, v in read_metrics(summary["metrics_path"]).items()
                  if "train/loss" in v}
        rows[mode] = dict(metrics, steps=summary["step"], first_loss=losses[min(losses)],
                          loss=losses[max(losses)], train_seconds=train_s,
                          attention_gflops=attention_flops(cfg, eval_layouts, mode) / 1e9)
        print(f"{mode}: step {summary['step']}, loss {rows[mode]['loss']:.4f}, {train_s:.0f}s, "
              f"identity {metrics['identity_consistency']}")
    for mode, films in identity.items():
        rows[mode]["identity_scored_shots"] = sum(map(len, films))
    names = SHOWN + ("identity_scored_shots", "attention_gflops", "loss")
    print("\n" + "metric".ljust(24) + "".join(m.rjust(13) for m in rows))
    for name in names:
        cells = [rows[m].get(name) for m in rows]
        print(name.ljust(24) + "".join(("-" if c is None else f"{c:.3f}").rjust(13) for c in cells))
    for mode in ("sparse", "full"):
        if mode in identity and "independent" in identity:
            lo, hi = bootstrap_gap(identity[mode], identity["independent"])
            rows[mode]["identity_gap_vs_independent_95"] = [lo, hi]
            print(f"identity consistency {mode} - independent: 95% interval [{lo:+.3f}, {hi:+.3f}] "
                  f"(bootstrap over the {len(held_out)} held-out films)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(args=vars(args), overrides=overrides, results=rows), f, indent=2)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
