"""`holocine-jax eval`: sample the evaluation films with every checkpoint step, score them.

    run_eval(config, "ckpt_dir", "data_dir", "workdir")
    run_eval(config, ["high_ckpt", "low_ckpt"], "data_dir", "workdir")   # an A14B expert pair

For each step point without a `metrics.json` yet (re-running skips done ones; one directory:
each complete step; an expert pair: see `step_points`), the films of `data_dir` (the first
`config.eval.num_films`; prompt = global + shot captions, the dataset's cuts, seed =
config.eval.seed + index) are sampled (a pair with the expert switch at
config.experts.boundary) and decoded, and the clu metrics of `metrics.py` are written through
training's clu metric writer (TensorBoard + metrics.jsonl in workdir/eval, tag eval/<name>) and
to workdir/eval/step_<N>/metrics.json, beside each film's contact sheet and mp4.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import orbax.checkpoint as ocp

from holocine_jax.checkpoint import check_experts, checkpoint_dirs
from holocine_jax.eval import metrics as M
from holocine_jax.files import atomic_file
from holocine_jax.prompts import build_prompt, parse_prompt
from holocine_jax.sample.output import write_film
from holocine_jax.sample.run import FilmRequest, generate, load_experts, text_stack
from holocine_jax.train.metrics import console, format_duration, make_writer
from holocine_jax.world import FilmSpec


def eval_films(config, data_dir: str):
    """(requests, truths) of the first config.eval.num_films films of a built dataset.

    truths[i]: the synthetic world's per-shot attributes when the film has them, else None.
    """
    from holocine_jax.data.dataset import decode_text, load_data_source

    source = load_data_source(data_dir)
    n = min(len(source), int(config.eval.num_films))
    if n == 0:
        raise ValueError(f"the dataset at {data_dir!r} has no films")
    films, truths = [], []
    for i in range(n):
        ex = decode_text(source[i])
        cuts = tuple(int(c) for c in np.asarray(ex["cut_frames"]))
        films.append(FilmRequest(build_prompt(ex["global_caption"], ex["shot_captions"]), cuts,
                                 config.video.num_frames, int(config.eval.seed) + i))
        truths.append(_world_truth(ex.get("attributes", ""), cuts))
    return films, truths


def _world_truth(attributes: str, cuts):
    """Per-shot ground truth of a synthetic film whose cuts match the clip's, else None."""
    try:
        spec = FilmSpec.from_dict(json.loads(attributes))
    except (ValueError, KeyError, TypeError):
        return None
    return spec.shot_attributes() if tuple(spec.cut_frames) == tuple(cuts) else None


def make_embedder(path: str):
    """The image embedder of config.eval.embedder: "" -> the built-in one, else a local
    transformers vision model directory (see embedders.py)."""
    if not path:
        return M.simple_embedder
    from holocine_jax.eval.embedders import TransformersImageEmbedder

    return TransformersImageEmbedder(path)


def make_text_scorer(path: str):
    """The text alignment of config.eval.text_scorer: "" -> the synthetic-world caption check,
    else a local CLIP model directory (see embedders.py)."""
    if not path:
        return M.world_text_alignment
    from holocine_jax.eval.embedders import ClipTextScorer

    return ClipTextScorer(path)


def score_films(config, clips, films, truths, *, embed=None, text_scorer=None) -> dict:
    """Metrics of decoded films: clips uint8 [T, H, W, 3] per film, in the order of `films`."""
    embed = embed or make_embedder(config.eval.embedder)
    text_scorer = text_scorer or make_text_scorer(config.eval.text_scorer)
    total = None
    for clip, film, truth in zip(clips, films, truths):
        m = M.film_metrics(clip, film.cuts, tolerance=int(config.eval.cut_tolerance),
                           embed=embed, captions=parse_prompt(film.prompt)[1],
                           text_scorer=text_scorer, truth=truth)
        total = m if total is None else total.merge(m)
    return M.to_floats(total.compute())


def checkpoint_steps(checkpoint: str) -> list[int]:
    """Complete steps of a checkpoint directory (orbax), oldest first."""
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint directory {checkpoint!r} does not exist")
    with ocp.CheckpointManager(os.path.abspath(checkpoint), item_names=("params",)) as manager:
        steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint step in {checkpoint!r}")
    return steps


def step_points(steps: list[list[int]]) -> list[tuple[int, ...]]:
    """The steps evaluated together, one per checkpoint directory (`steps`: each directory's
    complete steps, oldest first). One directory: each of its steps. An expert pair: each step
    number complete in both (experts trained side by side; an imported pair is step 0 in both);
    when they share none (one expert fine-tuned, the other imported), the latest of each."""
    if len(steps) == 1:
        return [(s,) for s in steps[0]]
    common = sorted(set(steps[0]).intersection(*steps[1:]))
    return [(s,) * len(steps) for s in common] or [tuple(s[-1] for s in steps)]


def point_name(point: tuple[int, ...]):
    """(result key, output directory) of a step point: (N,) or (N, N) -> N, "step_0000000N";
    a pair of different steps (H, L) -> (H, L), "step_0000000H_0000000L"."""
    key = point[0] if len(set(point)) == 1 else tuple(point)
    return key, "step_" + "_".join(f"{s:08d}" for s in ((key,) if isinstance(key, int) else key))


def evaluate_checkpoint(config, checkpoint, step, films, truths, workdir: str, *,
                        stack, writer=None, progress: bool = False) -> dict:
    """Sample + score one checkpoint step; writes films, metrics.json and TensorBoard scalars.

    checkpoint: a directory, or one per expert (high-noise first; sampled with the expert
    switch); step: an int, or one per directory (`step_points`). stack: (tokenizer, text
    encoder, vae), built once by the caller; writer: a clu MetricWriter
    (`train.metrics.make_writer`) for the scalars eval/<name> (at the largest step), or None.
    """
    paths = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    point = tuple(int(s) for s in np.broadcast_to(step, (len(paths),)))
    key, folder = point_name(point)
    out = os.path.join(workdir, "eval", folder)
    models = load_experts(config, paths, steps=point)
    tokenizer, encoder, vae = stack
    clips = [None] * len(films)
    start = time.perf_counter()
    for done, (i, film, clip, layout) in enumerate(
            generate(config, models, tokenizer, encoder, vae, films, progress=progress), 1):
        clips[i] = clip
        if progress:
            console(f"eval: {folder}: film {done}/{len(films)} sampled "
                    f"({format_duration(time.perf_counter() - start)})")
        write_film(os.path.join(out, f"film_{i:03d}"), clip, fps=config.video.fps,
                   cut_frames=layout.pixel_cuts(), metadata=dict(prompt=film.prompt, seed=film.seed,
                                                                  step=key))
    result = score_films(config, clips, films, truths)
    if writer is not None:
        writer.write_scalars(max(point), {f"eval/{name}": value for name, value in result.items()
                                          if value is not None})
        writer.flush()
    record = dict(step=key, checkpoint=checkpoint, num_films=len(films), metrics=result)
    if len(paths) > 1:
        record["experts"] = {e: dict(checkpoint=p, step=s)
                             for e, p, s in zip(config.experts.names, paths, point)}
    with atomic_file(os.path.join(out, "metrics.json")) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    if progress:
        console(f"eval: {folder}: scored, {os.path.join(out, 'metrics.json')}")
    return result


def run_eval(config, checkpoint, data_dir: str, workdir: str, *, progress: bool = True) -> dict:
    """Evaluate the step points (`step_points`) of `checkpoint` not yet in workdir ->
    {step or (high step, low step): metrics}. checkpoint: one directory, one per expert
    (high-noise first), or a run directory holding one per expert (`checkpoint.checkpoint_dirs`);
    experts in the wrong order are refused before anything is written."""
    from holocine_jax.vae import make_vae

    paths = checkpoint_dirs(checkpoint)
    check_experts(config, paths)
    points = step_points([checkpoint_steps(p) for p in paths])
    todo = [p for p in points if not os.path.exists(
        os.path.join(workdir, "eval", point_name(p)[1], "metrics.json"))]
    results = {}
    if progress:
        console(f"eval: {len(points)} step point(s), {len(points) - len(todo)} already scored")
    if todo:
        films, truths = eval_films(config, data_dir)
        stack = (*text_stack(config), make_vae(config))
        writer = make_writer(os.path.join(workdir, "eval"), console=False)
        try:
            for point in todo:
                results[point_name(point)[0]] = evaluate_checkpoint(
                    config, paths if len(paths) > 1 else paths[0], point, films, truths, workdir,
                    stack=stack, writer=writer, progress=progress)
        finally:
            writer.close()
    return results
