"""Sampling speed and the step cache's quality on the toy world (issue 16).

1. Trains the tiny config on the demo's synthetic data (`demo.build_data`, `train_on_dataset`;
   `--train-steps`; a rerun with the same workdir resumes / reuses the run).
2. Speed, one held-out film (tiny config: 20 Euler steps, shift 5, guidance 1): seconds per
   film, ours with the cache off and with TeaCache at each `--thresholds` value, plain Wan
   (layout None) and with the film's HoloCine layout, vs a torch loop over diffusers'
   `WanTransformer3DModel` holding the same weights (`save_diffusers`) with diffusers'
   `FlowMatchEulerDiscreteScheduler` on the same grid (shift 5, linspace(1, 0, N+1)[:-1]), same
   steps, noise and text. Repeats alternate between variants; medians after a compile run.
3. Quality: `--films` held-out films (`demo.held_out_film`, seeds HELD_OUT_SEED + k) sampled
   with the cache off and on (same seeds); the world metrics (`eval.job.score_films`:
   identity / room consistency, cuts, ...) and the change of the final latents.

    python benchmarks/sampling.py [--train-steps 500] [--films 16] [--thresholds 0.1,0.2]
        [--out benchmarks/results/sampling.json]

The skip schedule depends only on the model and the timestep grid (sample/cache.py), so every
film of a setting computes the same steps; the table shows them.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from holocine_jax.checkpoint import load_params
from holocine_jax.config import load_config
from holocine_jax.convert import save_diffusers
from holocine_jax.demo import HELD_OUT_SEED, build_data, held_out_film
from holocine_jax.eval.job import score_films
from holocine_jax.sample.cache import teacache_decide
from holocine_jax.sample.run import encode_texts, film_layout, generate, text_stack
from holocine_jax.sample.sampler import initial_noise, sample_film, scheduler_from_config
from holocine_jax.shots import latent_shape
from holocine_jax.train.run import train_on_dataset
from holocine_jax.vae import make_vae

SHOWN = ("identity_consistency", "room_consistency", "cut_precision", "cut_recall", "cut_exact",
         "inter_shot_consistency", "glass_accuracy", "framing_accuracy", "text_alignment")


def log(msg: str):
    print(f"sampling: {msg}", flush=True)


def with_cache(config, threshold=None):
    """A copy of config with TeaCache at `threshold` (None: cache off)."""
    c = config.copy_and_resolve_references()
    c.sample.cache = "none" if threshold is None else "teacache"
    if threshold is not None:
        c.sample.cache_threshold = float(threshold)
    return c


def indicator_changes(model, scheduler) -> list[float]:
    """The cache's raw indicator per step: relative L1 change of t_mod from the previous step."""
    t = jnp.asarray(scheduler.timesteps)
    _, t_mod, _ = model.condition_embedder(t, jnp.zeros((len(t), 1, model.config.text_dim)))
    return [float(teacache_decide(0.0, t_mod[i - 1], t_mod[i], False, threshold=np.inf,
                                  coefficients=(1.0, 0.0))[1]) for i in range(1, len(t))]


def torch_sampler(model_dir: str, config):
    """(noise [1, F, H, W, C], text, negative [1, Lt, D]) -> final latents: a plain torch loop
    over diffusers' Wan transformer and flow-match Euler scheduler, with classifier-free
    guidance as diffusers' WanPipeline does it (two passes) when the config's scale is not 1."""
    dit = WanTransformer3DModel.from_pretrained(model_dir).eval()
    s = config.sample
    scale = float(np.max(s.guidance_scale))
    sched = FlowMatchEulerDiscreteScheduler(shift=s.shift)

    @torch.no_grad()
    def sample(noise, text, negative):
        sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, s.num_steps + 1)[:-1].tolist())
        x = torch.from_numpy(np.asarray(noise)).permute(0, 4, 1, 2, 3).contiguous()
        text, negative = (torch.from_numpy(np.asarray(a)) for a in (text, negative))
        for t in sched.timesteps:
            v = dit(x, t[None], text, return_dict=False)[0]
            if scale != 1.0:
                u = dit(x, t[None], negative, return_dict=False)[0]
                v = u + scale * (v - u)
            x = sched.step(v, t, x, return_dict=False)[0]
        return x.permute(0, 2, 3, 4, 1).numpy()

    return sample


def speed(config, model, tokenizer, encoder, workdir, thresholds, repeats):
    """Median s/film per variant, the steps each computed, torch-vs-ours agreement."""
    film, _ = held_out_film(config, HELD_OUT_SEED)
    text = encode_texts(tokenizer, encoder, [film.prompt], config.model.text_len)
    negative = encode_texts(tokenizer, encoder, [config.sample.negative_prompt],
                            config.model.text_len)
    layout = film_layout(config, film, tokenizer)
    keys = jax.random.key(film.seed)[None]
    export = os.path.join(workdir, "diffusers")
    save_diffusers(model, export)
    run_torch = functools.partial(torch_sampler(export, config),
                                  initial_noise(keys, latent_shape(config, 1)), text, negative)
    variants, computed = {"torch diffusers (plain Wan)": run_torch}, {}

    def ours(c, lay, steps=None):
        return np.asarray(sample_film(model, c, text, negative, lay, keys, progress=False,
                                      computed=steps))

    for kind, lay in (("plain Wan", None), ("HoloCine", layout)):
        for tau in (None, *thresholds):
            name = f"ours {kind}, " + ("cache off" if tau is None else f"teacache {tau:g}")
            c = with_cache(config, tau)
            ours(c, lay, computed.setdefault(name, []))  # compiles; records the steps run
            variants[name] = functools.partial(ours, c, lay)
    finals = {name: fn() for name, fn in variants.items()}
    ref = finals["torch diffusers (plain Wan)"]
    ours = finals["ours plain Wan, cache off"]
    agreement = float(np.abs(ours - ref).max() / np.abs(ref).max())
    log(f"torch vs ours (plain Wan, cache off) final latents: max|diff| / max|ref| = {agreement:.2e}")
    times = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        log(f"speed repeat {r + 1}/{repeats} done")
    torch_s = statistics.median(times["torch diffusers (plain Wan)"])
    rows = {}
    for name, ts in times.items():
        s = statistics.median(ts)
        off = name.split(",")[0] + ", cache off"
        rows[name] = dict(seconds_per_film=s, torch_over_ours=torch_s / s,
                          speedup_vs_cache_off=(statistics.median(times[off]) / s
                                                if off in times else None),
                          computed_steps=(sum(computed[name]) if name in computed
                                          else config.sample.num_steps), times=ts)
    return rows, agreement


def quality(config, model, tokenizer, encoder, vae, thresholds, num_films):
    """World metrics of held-out films sampled with the cache off and at each threshold."""
    held_out = [held_out_film(config, HELD_OUT_SEED + k) for k in range(num_films)]
    films, truths = [f for f, _ in held_out], [s.shot_attributes() for _, s in held_out]
    rows, off_latents = {}, None
    for tau in (None, *thresholds):
        name = "cache off" if tau is None else f"teacache {tau:g}"
        cfg = with_cache(config, tau)
        cfg.sample.batch_size = num_films
        log(f"quality: {num_films} films, {name}")
        clips, latents = [None] * num_films, {}
        start = time.perf_counter()
        for i, _, clip, _ in generate(cfg, [model], tokenizer, encoder, vae, films, latents=latents):
            clips[i] = clip
        seconds = time.perf_counter() - start
        z = np.stack([latents[i] for i in range(num_films)])
        off_latents = z if off_latents is None else off_latents
        change = float(np.abs(z - off_latents).mean() / np.abs(off_latents).mean())
        rows[name] = dict(score_films(cfg, clips, films, truths), seconds=seconds,
                          latent_change_vs_off=change)
    return rows


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-steps", type=int, default=500)
    p.add_argument("--train-films", type=int, default=64)
    p.add_argument("--films", type=int, default=16, help="held-out films for the quality part")
    p.add_argument("--thresholds", default="0.1,0.2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default="/tmp/holocine-sampling-bench")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "sampling.json"))
    args, overrides = p.parse_known_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    config = load_config("tiny", overrides)
    config.train.update(steps=args.train_steps, checkpoint_every=args.train_steps,
                        warmup_steps=min(config.train.warmup_steps, args.train_steps // 10))
    tokenizer, encoder = text_stack(config)
    vae = make_vae(config)
    data = build_data(config, os.path.join(args.workdir, "data"), args.train_films)
    log(f"training the tiny config for {args.train_steps} steps on {args.train_films} films")
    summary = train_on_dataset(config, data, os.path.join(args.workdir, "train"),
                               tokenizer=tokenizer, text_encoder=encoder, vae=vae)
    model = load_params(summary["checkpoint_dir"], config)
    changes = indicator_changes(model, scheduler_from_config(config))
    log("t_mod relative L1 change per step: " + " ".join(f"{c:.3f}" for c in changes))
    log(f"speed: one film, {len(thresholds)} thresholds, {args.repeats} repeats")
    speed_rows, agreement = speed(config, model, tokenizer, encoder, args.workdir, thresholds,
                                  args.repeats)
    quality_rows = quality(config, model, tokenizer, encoder, vae, thresholds, args.films)

    print(f"\nspeed ({config.sample.num_steps} steps, tiny config, train step {summary['step']})")
    print("variant".ljust(36) + "s/film".rjust(9) + "torch/ours".rjust(12) +
          "vs off".rjust(8) + "steps run".rjust(11))
    for name, r in speed_rows.items():
        print(name.ljust(36) + fmt(r["seconds_per_film"]).rjust(9) +
              fmt(r["torch_over_ours"], ".2f").rjust(12) +
              fmt(r["speedup_vs_cache_off"], ".2f").rjust(8) + str(r["computed_steps"]).rjust(11))
    print(f"\nquality ({args.films} held-out films, HoloCine layout)")
    print("metric".ljust(26) + "".join(n.rjust(15) for n in quality_rows))
    for metric in SHOWN + ("latent_change_vs_off",):
        print(metric.ljust(26) + "".join(fmt(r.get(metric)).rjust(15)
                                        for r in quality_rows.values()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(args=vars(args), overrides=overrides,
                       train=dict(steps=summary["step"], loss=summary["loss"]),
                       t_mod_changes=changes, torch_agreement=agreement, speed=speed_rows,
                       quality=quality_rows), f, indent=2)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
