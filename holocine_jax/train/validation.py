"""Validation films during training (DESIGN §10): every `config.train.validate_every` steps, a
fixed set of held-out prompts is sampled with the current weights (EMA when
config.train.ema_decay > 0) and written through the loop's clu writer.

    validate = ValidationFilms(config, graphdef, rest, writer, tokenizer=tok, text_encoder=enc,
                               vae=vae, score=score)       # built once by the loop
    validate(step, state)                                   # TrainState; reads it, changes nothing

Films: `config.train.validation_prompts` (a JSONL prompt file in `holocine-jax sample`'s format,
`sample.run.read_prompt_file`; the first `validation_films` lines, seed validation_seed + i
unless a line names one), or with no file the synthetic world's held-out films (`held_out_film`,
seeds validation_seed + i, the demo's film first). Sampling: config.sample with
`validation_steps` steps (few: a validation stays a fraction of the training time).

Written per film i (TensorBoard tags): `val/film_<i>` (video; an animated GIF with
tensorboardX), `val/contact_sheet_<i>` (image, a row per shot); scalars `val/<metric>` from
`score(clips, films, truths)` (the synthetic world's exact metrics: eval.job.score_films; train/
sits below eval/, so the caller passes it) and `val/seconds`. The sampling reuses one compiled
program per run (sample/sampler.py caches it per model structure).

Cost: validation_films x validation_steps guided sampler steps (both CFG passes in one batch)
plus, at the first validation, one compile of the sampling step; `val/seconds` records it.
"""
from __future__ import annotations

import os
import time

import numpy as np
from flax import nnx

from holocine_jax import prompts, world
from holocine_jax.sample.output import contact_sheet
from holocine_jax.shots import latent_num_frames
from holocine_jax.sample.run import FilmRequest, generate, read_prompt_file
from holocine_jax.train.metrics import console, format_duration

HELD_OUT_SEED = 1_000_000  # film seeds from here on are never in the demo's training data


def held_out_film(config, seed: int = HELD_OUT_SEED):
    """(FilmRequest, FilmSpec) of a synthetic film with the most shots the config allows (and
    its frames hold: shots of >= 2 latent frames)."""
    fit = latent_num_frames(config.video.num_frames) // 2
    shots = max(2, min(world.MAX_SHOTS, config.shots.max_shots, fit))
    spec = world.sample_film(seed, num_frames=config.video.num_frames, shot_range=(shots, shots))
    prompt = prompts.build_prompt(spec.global_caption, spec.shot_captions)
    return FilmRequest(prompt, tuple(spec.cut_frames), config.video.num_frames, seed), spec


def validation_films(config) -> tuple[list[FilmRequest], list]:
    """(films, truths): the run's fixed validation set; truths[i] the world's per-shot ground
    truth (FilmSpec.shot_attributes()) for synthetic films, None for prompt-file films."""
    tc = config.train
    n, seed = int(tc.validation_films), int(tc.validation_seed)
    if n < 1:
        raise ValueError(f"config.train.validation_films={tc.validation_films} must be >= 1 "
                         "when config.train.validate_every > 0")
    if tc.validation_prompts:
        films = read_prompt_file(tc.validation_prompts)[:n]
        films = [f if f.seed is not None else FilmRequest(f.prompt, f.cuts, f.num_frames, seed + i)
                 for i, f in enumerate(films)]
        return films, [None] * len(films)
    pairs = [held_out_film(config, seed + i) for i in range(n)]
    return [f for f, _ in pairs], [s.shot_attributes() for _, s in pairs]


def sampling_config(config):
    """config for the validation sampler: `train.validation_steps` steps; an A14B expert run
    (one expert trained) samples with its own expert's guidance scale."""
    cfg = config.copy_and_resolve_references()
    steps = int(config.train.validation_steps)
    if steps < 1:
        raise ValueError(f"config.train.validation_steps={steps} must be >= 1")
    cfg.sample.num_steps = steps
    g, names = config.sample.guidance_scale, tuple(config.experts.names)
    if isinstance(g, (tuple, list)) and names:
        cfg.sample.guidance_scale = float(g[names.index(config.expert)])
    return cfg


class ValidationFilms:
    """`validate(step, state)`: sample, write and score the validation films (module docstring).

    graphdef, rest: the loop's model split (`train.state.split_model`); the model sampled is
    nnx.merge(graphdef, state.ema or state.params, state.frozen, rest), as the train step
    merges it. writer: a clu MetricWriter. score: (clips uint8 [T, H, W, 3] per film, films,
    truths) -> {name: float | None}, or None (videos and sheets only).
    """

    def __init__(self, config, graphdef, rest, writer, *, tokenizer, text_encoder, vae,
                 score=None):
        self.films, self.truths = validation_films(config)
        self.config = sampling_config(config)
        self.use_ema = float(config.train.ema_decay) > 0
        self.graphdef, self.rest, self.writer = graphdef, rest, writer
        self.stack = (tokenizer, text_encoder, vae)
        self.score = score
        self.fps = float(config.video.fps)

    def model(self, state):
        params = state.ema if self.use_ema and state.ema is not None else state.params
        return nnx.merge(self.graphdef, params, state.frozen, self.rest)

    def __call__(self, step: int, state) -> dict:
        """Returns the scalars written (val/<metric>, val/seconds)."""
        start = time.perf_counter()
        n = len(self.films)
        console(f"validate: step {step}: sampling {n} film(s), {self.config.sample.num_steps} "
                f"steps, guidance {self.config.sample.guidance_scale} ...")
        tokenizer, encoder, vae = self.stack
        clips = [None] * n
        for done, (i, film, clip, layout) in enumerate(generate(
                self.config, [self.model(state)], tokenizer, encoder, vae, self.films,
                progress=False), 1):
            clips[i] = clip
            sheet = contact_sheet(clip, layout.pixel_cuts(), columns=self.config.sample.contact_columns)
            self.writer.write_videos(step, {f"val/film_{i:02d}": clip[None]})
            self.writer.write_images(step, {f"val/contact_sheet_{i:02d}": sheet[None]})
            console(f"validate: step {step}: film {done}/{n} "
                    f"({format_duration(time.perf_counter() - start)})")
        scores = self.score(clips, self.films, self.truths) if self.score is not None else {}
        scalars = {f"val/{k}": float(v) for k, v in scores.items() if v is not None}
        scalars["val/seconds"] = time.perf_counter() - start
        self.writer.write_scalars(step, scalars)
        self.writer.flush()
        shown = ", ".join(f"{k[4:]} {v:.3f}" for k, v in scalars.items() if k != "val/seconds")
        console(f"validate: step {step}: done in {format_duration(scalars['val/seconds'])}"
                + (f": {shown}" if shown else ""))
        return scalars


def prompt_file_hint(path: str) -> str:
    """An error's hint for a missing validation prompt file."""
    return (f"config.train.validation_prompts={path!r} does not exist (a JSONL prompt file as "
            "`holocine-jax sample --prompt-file` reads)") if path and not os.path.exists(path) else ""
