"""HoloCine's Table 2 on the toy world: which attention keeps a film consistent? (issues 10, 20)

Trains the tiny model on the same synthetic-world films, steps and seeds once per row, samples
the same held-out prompts with each, reads the films back (world/reader.py) and prints one table:

- `sparse`: HoloCine (dense inside a shot, summary = first latent frame of every shot);
- `full`: dense attention over the whole film;
- `independent`: each shot alone (the paper's "sparse zero": no inter-shot summary; Wan shot by
  shot);
- `no_window`: sparse, but every shot's tokens read every caption (no window cross-attention,
  `shots.window_cross_attention=False`);
- `summary2`: sparse with the first two latent frames of each shot as its summary
  (`shots.summary_frames=2`), a variant beyond the paper's released choice.

Columns: SCA, identity / room consistency (shot k reads like shot 1), glass, framing and entry
side accuracy, inter-shot consistency, text alignment, self-attention GFLOPs per film (from
`ShotLayout.num_allowed_pairs` of the held-out layouts), final training loss and train seconds.
The `autoencoder` row reads the held-out ground truth after the autoencoder's round trip: the
ceiling of what a generated film can score. Gaps between rows come with 95% bootstrap intervals
over the held-out films (paired: the same films in both rows). Writes
benchmarks/results/consistency.json after every row.

    python benchmarks/consistency.py                  # the tiny config, 2500 steps per row
    python benchmarks/consistency.py --rows sparse,full --steps 1000 --eval-films 64

Captions never name the colour, pattern or room, so identity and room consistency can only come
from information flowing between shots.
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
from holocine_jax.config import apply_override, load_config
from holocine_jax.eval.job import film_values, pooled_metrics
from holocine_jax.eval.scorers import load_scorers
from holocine_jax.parallel import skip_absent_tpu
from holocine_jax.sample.output import to_uint8
from holocine_jax.sample.run import FilmRequest, encode_texts, film_layout, generate, text_stack
from holocine_jax.shots import ShotLayout
from holocine_jax.train.loop import run_training
from holocine_jax.train.metrics import console, read_metrics
from holocine_jax.vae import make_vae, normalize_latents

# Row -> config overrides on top of the tiny config (sparse attention, window cross-attention).
ROWS = {
    "sparse": (),
    "full": ("attention.mode=full",),
    "independent": ("attention.mode=independent",),
    "no_window": ("shots.window_cross_attention=False",),
    "summary2": ("shots.summary_frames=2",),
}
EVAL_SEED = 1_000_000
COLUMNS = (("SCA", "shot_cut_accuracy"), ("identity", "identity_consistency"),
           ("room", "room_consistency"), ("glass", "glass_accuracy"),
           ("framing", "framing_accuracy"), ("entry", "entry_side_accuracy"),
           ("inter-shot", "inter_shot_consistency"), ("text", "text_alignment"),
           ("GFLOPs", "attention_gflops"), ("loss", "loss"), ("train s", "train_seconds"))
# (row a, row b, metric): the gaps reported with bootstrap intervals.
GAPS = (("sparse", "full", "identity_consistency"),
        ("sparse", "independent", "identity_consistency"),
        ("full", "independent", "identity_consistency"),
        ("summary2", "sparse", "identity_consistency"),
        ("sparse", "no_window", "shot_cut_accuracy"),
        ("sparse", "no_window", "framing_accuracy"),
        ("sparse", "no_window", "glass_accuracy"))


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
    """Normalised latents [N, F, h, w, z] and text states [N, Lt, D] of the films."""
    v = config.video
    latents, texts = [], []
    encode = jax.jit(vae.encode)
    for start in range(0, len(films), chunk):
        part = films[start:start + chunk]
        video = np.stack([world.render_film(s, height=v.height, width=v.width) for _, s in part])
        z = normalize_latents(encode(jnp.asarray(video, jnp.float32) / 127.5 - 1.0), config)
        latents.append(np.asarray(z))
        texts.append(np.asarray(encode_texts(tokenizer, encoder, [f.prompt for f, _ in part],
                                             config.model.text_len)))
    return np.concatenate(latents), np.concatenate(texts)


def bootstrap_gap(a, b, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b), values pooled over the resampled films (paired).
    a, b: per film, the list of that film's values of one metric (as `film_values`)."""
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(draws):
        idx = rng.integers(len(a), size=len(a))
        pa = [v for i in idx for v in a[i]]
        pb = [v for i in idx for v in b[i]]
        if pa and pb:
            gaps.append(np.mean(pa) - np.mean(pb))
    return float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))


def attention_flops(config, layouts) -> float:
    """Mean self-attention matmul FLOPs per film: QK^T and PV over the layout's allowed pairs
    under config.attention.mode, all layers."""
    m = config.model
    pairs = np.mean([l.num_allowed_pairs(config.attention.mode) for l in layouts])
    return 4.0 * pairs * m.dim * m.num_layers


def row_config(config, row: str):
    cfg = config.copy_and_resolve_references()
    for item in ROWS[row]:
        apply_override(cfg, item)
    return cfg


def print_table(rows: dict) -> None:
    print("\n" + "row".ljust(12) + "".join(h.rjust(11) for h, _ in COLUMNS))
    for row, r in rows.items():
        cells = [r.get(key) for _, key in COLUMNS]
        print(row.ljust(12) + "".join(("-" if c is None else f"{c:.3f}").rjust(11) for c in cells))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--train-films", type=int, default=256)
    p.add_argument("--eval-films", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default: the tiny config's, which trains with caption dropout)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in --workdir (e.g. to --steps more) instead of restarting")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--workdir", default="/tmp/holocine-consistency")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "consistency.json"))
    args, overrides = p.parse_known_args(argv)
    chosen = args.rows.split(",")
    unknown = [r for r in chosen if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    skip_absent_tpu()
    config = load_config("tiny")
    config.train.update(steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                        warmup_steps=min(50, args.steps // 10), log_every=50,
                        checkpoint_every=args.steps, keep_checkpoints=1, validate_every=0)
    config.sample.update(num_steps=args.sample_steps, batch_size=args.eval_films)
    # Cuts by frame difference: the world's cuts are hard cuts, and TransNetV2 (~1 s per film
    # here) misses framing-only cuts at 64x64.
    config.eval.cut_detector = "frame_difference"
    if args.guidance is not None:
        config.sample.guidance_scale = args.guidance
    for item in overrides:  # --config.* last: a user's override wins over the defaults above
        apply_override(config, item)
    tokenizer, encoder = text_stack(config)
    vae = make_vae(config)
    scorers = load_scorers(config)
    train = world_films(config, range(args.train_films))
    held_out = world_films(config, range(EVAL_SEED, EVAL_SEED + args.eval_films))
    films = [f for f, _ in held_out]
    truths = [s.shot_attributes() for _, s in held_out]
    start = time.perf_counter()
    latents, texts = encode_world(config, train, tokenizer, encoder, vae)
    console(f"encoded {len(train)} training films in {time.perf_counter() - start:.1f}s")

    def score(cfg, clips):
        values = [film_values(cfg, scorers, clip, f.cuts, f, t)
                  for clip, f, t in zip(clips, films, truths)]
        return pooled_metrics(values), values

    # The ceiling: held-out ground truth through the autoencoder, read like a generated film.
    v = config.video
    video = np.stack([world.render_film(s, height=v.height, width=v.width) for _, s in held_out])
    recon = to_uint8(vae.decode(vae.encode(jnp.asarray(video, jnp.float32) / 127.5 - 1.0)))
    rows, values = {}, {}
    rows["autoencoder"], values["autoencoder"] = score(config, list(recon))
    result = dict(args=vars(args), overrides=overrides, rows=rows, gaps={})
    for row in chosen:
        cfg = row_config(config, row)
        work = os.path.join(args.workdir, row)
        if not args.resume:
            shutil.rmtree(work, ignore_errors=True)
        layouts = [film_layout(cfg, f, tokenizer) for f, _ in train]
        console(f"{row}: training {args.steps} steps ({', '.join(ROWS[row]) or 'HoloCine'})")
        t0 = time.perf_counter()
        summary = run_training(cfg, work, batches=WorldBatches(latents, texts, layouts,
                                                               args.batch, cfg.seed),
                               tokenizer=tokenizer, text_encoder=encoder)
        train_s = time.perf_counter() - t0
        model = load_params(summary["checkpoint_dir"], cfg)
        console(f"{row}: sampling {len(films)} held-out films")
        clips = [None] * len(films)
        for i, _, clip, _ in generate(cfg, [model], tokenizer, encoder, vae, films, progress=False):
            clips[i] = clip
        metrics, values[row] = score(cfg, clips)
        losses = {k: x["train/loss"] for k, x in read_metrics(summary["metrics_path"]).items()
                  if "train/loss" in x}
        eval_layouts = [film_layout(cfg, f, tokenizer) for f in films]
        # train_seconds: this call's training, from trained_from_step (> 0 under --resume)
        rows[row] = dict(metrics, steps=summary["step"], trained_from_step=summary["start_step"],
                         loss=losses[max(losses)], train_seconds=train_s,
                         attention_gflops=attention_flops(cfg, eval_layouts) / 1e9)
        rows[row]["identity_scored_shots"] = sum(len(x["identity_consistency"]) for x in values[row])
        console(f"{row}: step {summary['step']}, loss {rows[row]['loss']:.4f}, {train_s:.0f}s "
                f"training, identity {metrics['identity_consistency']}, "
                f"SCA {metrics['shot_cut_accuracy']}")
        for a, b, name in GAPS:
            if a in values and b in values:
                lo, hi = bootstrap_gap([x[name] for x in values[a]], [x[name] for x in values[b]])
                result["gaps"][f"{name}: {a} - {b}"] = [lo, hi]
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print_table(rows)
    for gap, (lo, hi) in result["gaps"].items():
        print(f"{gap}: 95% interval [{lo:+.3f}, {hi:+.3f}] (bootstrap over {len(films)} films)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
