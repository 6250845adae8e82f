"""`holocine-jax demo`: the whole product on a laptop CPU, on the embedded synthetic world.

    summary = run_demo(load_config("tiny"), "/tmp/holocine-demo")

1. writes a synthetic multi-shot dataset (TFDS / ArrayRecord) into `workdir/data`;
2. encodes it once (`holocine-jax data encode`: latents of the DCT autoencoder and states of the
   tiny text encoder in `workdir/data/encoded`), so training steps do not re-encode clips;
3. trains the tiny Wan DiT on it as `holocine-jax train` does (`workdir/train`: orbax
   checkpoints, TensorBoard + metrics.jsonl);
4. samples one held-out multi-shot film (`workdir/film`: film.mp4, contact_sheet.png, film.json);
5. evaluates it against the world's ground truth (`workdir/film/metrics.json`).

Each stage skips what an earlier run of the same workdir already finished, so an interrupted
demo resumes (training resumes from its latest checkpoint). Each phase (data / encode / train /
sample / score) prints its start and its time on stderr; `demo.json` records the times.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time

import numpy as np

from holocine_jax.train.validation import HELD_OUT_SEED, held_out_film  # noqa: F401 (the demo's film)


def build_data(config, data_dir: str, num_films: int) -> str:
    """The synthetic dataset of the demo (written once)."""
    from holocine_jax.data.dataset import write_synthetic_dataset

    if not os.path.exists(os.path.join(data_dir, "build_report.json")):
        shutil.rmtree(data_dir, ignore_errors=True)
        write_synthetic_dataset(data_dir, num_films, config.seed, config)
    return data_dir


@contextlib.contextmanager
def phase(name: str, times: dict, what: str):
    """`demo: <name>: <what> ...` on stderr, then `demo: <name> done (<time>)`; the seconds go
    into times[name]."""
    from holocine_jax.train.metrics import format_duration

    print(f"demo: {name}: {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    times[name] = round(time.perf_counter() - start, 2)
    print(f"demo: {name} done ({format_duration(times[name])})", file=sys.stderr, flush=True)


def sample_and_score(config, checkpoint: str, out_dir: str, *, times: dict | None = None,
                     scorers=None) -> dict:
    """Sample the held-out film with `checkpoint`, write it and its metrics.json (phases
    "sample" and "score", timed into `times`; scorers: `eval.scorers.load_scorers(config)`)."""
    from holocine_jax.data.video import read_video
    from holocine_jax.eval.metrics import film_metrics, to_floats
    from holocine_jax.eval.scorers import load_scorers
    from holocine_jax.prompts import parse_prompt
    from holocine_jax.sample.run import run_sample

    times = {} if times is None else times
    film, spec = held_out_film(config)
    shutil.rmtree(out_dir, ignore_errors=True)
    with phase("sample", times, f"one held-out {spec.num_shots}-shot film -> {out_dir}"):
        paths = run_sample(config, checkpoint, [film], out_dir)[0]
    with phase("score", times, "cuts, identity and captions against the world's ground truth"):
        frames = read_video(paths["mp4"])  # score what a viewer sees: the encoded film
        scorers = scorers or load_scorers(config)
        scores = to_floats(film_metrics(
            frames, spec.cut_frames, scorers=scorers, truth=spec.shot_attributes(),
            global_caption=parse_prompt(film.prompt)[0], captions=list(spec.shot_captions),
            tolerance=int(config.eval.cut_tolerance),
            penalty=float(config.eval.sca_penalty)).compute())
    paths["metrics"] = os.path.join(out_dir, "metrics.json")
    with open(paths["metrics"], "w") as f:
        json.dump(dict(seed=film.seed, prompt=film.prompt, metrics=scores), f, indent=2)
    return dict(paths=paths, metrics=scores)


def run_demo(config, workdir: str, *, num_films: int = 64) -> dict:
    """Data -> training -> one sampled film -> metrics, all under `workdir`. Returns paths,
    the training summary, the film's metrics and the phases' seconds ("times")."""
    from holocine_jax.data.encode import cache_dir, encode_dataset
    from holocine_jax.eval.job import score_films
    from holocine_jax.eval.scorers import load_scorers
    from holocine_jax.text import load_text_stack
    from holocine_jax.train.run import train_on_dataset
    from holocine_jax.vae import make_vae

    os.makedirs(workdir, exist_ok=True)
    times: dict[str, float] = {}
    data_dir = os.path.join(workdir, "data")
    with phase("data", times, f"{num_films} synthetic films in {data_dir} (built once)"):
        build_data(config, data_dir, num_films)
    tokenizer, encoder = load_text_stack(config)
    vae = make_vae(config)
    with phase("encode", times, f"latents + text states of the films -> {cache_dir(data_dir)}"):
        encode_dataset(data_dir, config, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                       batch_size=8)
    train_dir = os.path.join(workdir, "train")
    with phase("train", times, f"the {config.name} config for {config.train.steps} steps -> {train_dir}"):
        scorers = load_scorers(config)
        summary = train_on_dataset(config, data_dir, train_dir, tokenizer=tokenizer,
                                   text_encoder=encoder, vae=vae,
                                   validation_score=lambda clips, films, truths: score_films(
                                       config, clips, films, truths, scorers=scorers))
    film = sample_and_score(config, summary["checkpoint_dir"], os.path.join(workdir, "film"),
                            times=times, scorers=scorers)
    result = dict(data=data_dir, train=summary, times=times, **film)
    with open(os.path.join(workdir, "demo.json"), "w") as f:
        json.dump(result, f, indent=2, default=lambda x: np.asarray(x).tolist())
    return result
