"""`holocine-jax eval`: sample the evaluation films with every checkpoint step, score them.

    run_eval(config, "ckpt_dir", "data_dir", "workdir")
    run_eval(config, ["high_ckpt", "low_ckpt"], None, "workdir", prompts="bench.jsonl")

Films: the first `config.eval.num_films` of a built dataset (prompt = global + shot captions,
the dataset's cuts, seed = config.eval.seed + index; synthetic films keep their ground truth),
or every line of a benchmark prompt file (`prompt_films`: global caption, shot captions with
character tags, cuts, frames, seed). For each step point (one directory: each complete step;
an expert pair: see `step_points`) every film not yet scored is sampled (a pair with the expert
switch at config.experts.boundary), decoded and scored at once (`metrics.film_values` with the
scorers of `scorers.py`) into workdir/eval/step_<N>/film_<i>/ (mp4, contact sheet,
metrics.json); re-running skips scored films and loads no model when nothing is left. Per step
point: metrics.json (the clu averages over its films), TensorBoard + metrics.jsonl scalars
eval/<name> through training's clu writer, and workdir/eval/table.md, one row per step point in
the paper's Table 1 column order.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import orbax.checkpoint as ocp

from holocine_jax import files
from holocine_jax.checkpoint import check_experts, checkpoint_dirs
from holocine_jax.eval import metrics as M
from holocine_jax.eval.scorers import load_scorers, scorer_notes
from holocine_jax.prompts import build_prompt, check_character_tags, parse_prompt
from holocine_jax.sample.output import write_film
from holocine_jax.sample.run import (FilmRequest, generate, load_experts, read_prompt_file,
                                     text_stack)
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


def prompt_films(path: str):
    """(requests, truths) of a benchmark prompt file (JSONL, the `sample --prompt-file` format:
    global caption, shot captions, cuts, frames, seed per line); character tags must parse.
    Errors name the file, the line and the field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark prompt file {path!r} does not exist")
    films = read_prompt_file(path)
    with open(path, encoding="utf-8") as f:
        lines = [n for n, line in enumerate(f, 1) if line.strip()]
    for n, film in zip(lines, films):
        glob, captions = parse_prompt(film.prompt)
        for field, text in [("global_caption", glob)] + [
                (f"shots[{k}]", c) for k, c in enumerate(captions)]:
            try:
                check_character_tags(text)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {field}: {e}") from None
    return films, [None] * len(films)


def _world_truth(attributes: str, cuts):
    """Per-shot ground truth of a synthetic film whose cuts match the clip's, else None."""
    try:
        spec = FilmSpec.from_dict(json.loads(attributes))
    except (ValueError, KeyError, TypeError):
        return None
    return spec.shot_attributes() if tuple(spec.cut_frames) == tuple(cuts) else None


def score_films(config, clips, films, truths, *, scorers=None) -> dict:
    """Metrics of decoded films (validation films, the demo): clips uint8 [T, H, W, 3] per film,
    in the order of `films`; scorers: `metrics.Scorers` (default: `load_scorers(config)`)."""
    scorers = scorers or load_scorers(config)
    return pooled_metrics([film_values(config, scorers, clip, film.cuts, film, truth)
                           for clip, film, truth in zip(clips, films, truths)])


def pooled_metrics(values: list[dict]) -> dict:
    """The metrics of films from their per-film `film_values` (each value pooled, as clu)."""
    total = None
    for v in values:
        m = M.FilmMetrics.from_values(v)
        total = m if total is None else total.merge(m)
    return M.to_floats(total.compute())


def film_values(config, scorers, clip, cuts, film: FilmRequest, truth, detected=None) -> dict:
    """`metrics.film_values` of one decoded film with config.eval's tolerance and SCA penalty."""
    glob, captions = parse_prompt(film.prompt)
    return M.film_values(clip, cuts, scorers=scorers, global_caption=glob, captions=captions,
                         truth=truth, detected=detected, tolerance=int(config.eval.cut_tolerance),
                         penalty=float(config.eval.sca_penalty))


def checkpoint_steps(checkpoint: str) -> list[int]:
    """Complete steps of a checkpoint directory (orbax), oldest first."""
    if not files.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint directory {checkpoint!r} does not exist")
    with ocp.CheckpointManager(files.resolve(checkpoint), item_names=("params",)) as manager:
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


def film_record(film: FilmRequest) -> dict:
    """What identifies a film to score: its request's prompt, cuts, frames and seed."""
    return dict(prompt=film.prompt, cuts=None if film.cuts is None else [int(c) for c in film.cuts],
                frames=film.num_frames, seed=film.seed)


def scored_film(folder: str, request: dict | None):
    """The record of a film scored before in `folder` (None if not yet); raises when it was
    scored for another request (a changed benchmark line), naming the folder."""
    path = os.path.join(folder, "metrics.json")
    if not files.exists(path):
        return None
    record = json.loads(files.read_text(path))
    if request is not None and record["request"] != request:
        raise ValueError(f"{folder} was scored for another film ({record['request']}) than "
                         f"{request}; remove the folder to score the new one")
    return record


def point_done(workdir: str, point, films) -> bool:
    """Whether a step point has its metrics.json over `films`, each one scored (a film folder
    scored for another request raises, see `scored_film`)."""
    out = os.path.join(workdir, "eval", point_name(point)[1])
    scored = [scored_film(os.path.join(out, f"film_{i:03d}"), film_record(f))
              for i, f in enumerate(films)]
    path = os.path.join(out, "metrics.json")
    if not files.exists(path) or None in scored:
        return False
    return json.loads(files.read_text(path))["num_films"] == len(films)


def evaluate_checkpoint(config, checkpoint, step, films, truths, workdir: str, *,
                        stack, scorers, writer=None, progress: bool = False) -> dict:
    """Sample + score the films of one step point not yet scored; writes each film's folder,
    the step's metrics.json and TensorBoard scalars; returns the step's metrics.

    checkpoint: a directory, or one per expert (high-noise first; sampled with the expert
    switch); step: an int, or one per directory (`step_points`). stack: (tokenizer, text
    encoder, vae), built once by the caller (or a callable returning it, called only when a
    film needs sampling); scorers: `metrics.Scorers`; writer: a clu MetricWriter or None.
    """
    paths = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    point = tuple(int(s) for s in np.broadcast_to(step, (len(paths),)))
    key, folder = point_name(point)
    out = os.path.join(workdir, "eval", folder)
    film_dir = lambda i: os.path.join(out, f"film_{i:03d}")  # noqa: E731
    records = {i: scored_film(film_dir(i), film_record(f)) for i, f in enumerate(films)}
    todo = [i for i, r in records.items() if r is None]
    if todo:
        models = load_experts(config, paths, steps=point)
        tokenizer, encoder, vae = stack() if callable(stack) else stack
        start = time.perf_counter()
        for done, (j, film, clip, layout) in enumerate(generate(
                config, models, tokenizer, encoder, vae, [films[i] for i in todo],
                progress=progress), 1):
            i = todo[j]
            records[i] = score_film(config, scorers, film_dir(i), film, clip, layout.pixel_cuts(),
                                    truths[i], step=key)
            if progress:
                console(f"eval: {folder}: film {done}/{len(todo)} sampled and scored "
                        f"({format_duration(time.perf_counter() - start)})")
    result = pooled_metrics([records[i]["values"] for i in range(len(films))])
    if writer is not None:
        writer.write_scalars(max(point), {f"eval/{name}": value for name, value in result.items()
                                          if value is not None})
        writer.flush()
    record = dict(step=key, checkpoint=checkpoint, num_films=len(films), metrics=result,
                  scorers=scorers.names, sca_penalty=float(config.eval.sca_penalty))
    if len(paths) > 1:
        record["experts"] = {e: dict(checkpoint=p, step=s)
                             for e, p, s in zip(config.experts.names, paths, point)}
    files.write_text(os.path.join(out, "metrics.json"), json.dumps(record, indent=2))
    if progress:
        console(f"eval: {folder}: scored {len(todo)} new of {len(films)} films, "
                f"{os.path.join(out, 'metrics.json')}")
    return result


def score_film(config, scorers, folder: str, film: FilmRequest, clip, cuts, truth, *,
               step) -> dict:
    """Write one sampled film (mp4, contact sheet) and its metrics.json (request, detected
    cuts, per-metric values and means) into `folder`; returns that record."""
    detected = [int(c) for c in scorers.cuts(clip)]
    values = film_values(config, scorers, clip, cuts, film, truth, detected)
    record = dict(request=film_record(film), cuts=[int(c) for c in cuts], frames=len(clip),
                  step=step, detected_cuts=detected,
                  metrics=M.to_floats(M.FilmMetrics.from_values(values).compute()),
                  values=values)
    with files.staged_directory(folder) as local:   # gs://: uploaded, metrics.json last
        write_film(local, clip, fps=config.video.fps, cut_frames=list(cuts),
                   metadata=dict(prompt=film.prompt, seed=film.seed, step=step))
        files.write_text(os.path.join(local, "metrics.json"), json.dumps(record, indent=2))
    return record


def write_table(config, workdir: str, scorers) -> str:
    """workdir/eval/table.md: one row per scored step point, Table 1's columns."""
    rows = {}
    root = os.path.join(workdir, "eval")
    for name in files.listdir(root):
        path = os.path.join(root, name, "metrics.json")
        if name.startswith("step_") and files.exists(path):
            rows[name.replace("_", " ", 1)] = json.loads(files.read_text(path))["metrics"]
    table = os.path.join(root, "table.md")
    files.write_text(table, M.table1_markdown(rows, scorer_notes(config, scorers)))
    return table


def run_eval(config, checkpoint, data_dir: str | None, workdir: str, *, prompts: str | None = None,
             progress: bool = True) -> dict:
    """Evaluate the step points (`step_points`) of `checkpoint` on the films of `data_dir` or
    of the benchmark file `prompts` (exactly one) -> {step or (high step, low step): metrics}.
    checkpoint: one directory, one per expert (high-noise first), or a run directory holding one
    per expert (`checkpoint.checkpoint_dirs`); experts in the wrong order, a bad prompt file or
    missing scorer weights are refused before anything is written."""
    from holocine_jax.vae import make_vae

    if (data_dir is None) == (prompts is None):
        raise ValueError("give the films to evaluate: a dataset directory or a prompt file "
                         "(one of them)")
    paths = checkpoint_dirs(checkpoint)
    check_experts(config, paths)
    points = step_points([checkpoint_steps(p) for p in paths])
    films, truths = eval_films(config, data_dir) if prompts is None else prompt_films(prompts)
    scorers = load_scorers(config)
    if progress:
        console(f"eval: {len(films)} films; scorers: "
                + "; ".join(f"{k} = {v}" for k, v in scorers.names.items()))
    stack = []

    def models_stack():  # built once, only if some film needs sampling
        if not stack:
            stack.extend([*text_stack(config), make_vae(config)])
        return stack

    results = {}
    todo = [p for p in points if not point_done(workdir, p, films)]
    if progress:
        console(f"eval: {len(points)} step point(s), {len(points) - len(todo)} already scored")
    workdir = files.resolve(workdir)   # local or gs://
    files.makedirs(os.path.join(workdir, "eval"))
    writer = make_writer(os.path.join(workdir, "eval"), console=False)
    try:
        for point in todo:
            results[point_name(point)[0]] = evaluate_checkpoint(
                config, paths if len(paths) > 1 else paths[0], point, films, truths, workdir,
                stack=models_stack, scorers=scorers, writer=writer, progress=progress)
    finally:
        writer.close()
    table = write_table(config, workdir, scorers)
    if progress:
        console(f"eval: table {table}")
    return results
