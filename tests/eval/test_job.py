"""The evaluation job: per-step metrics.json + TensorBoard, done steps skipped, known answers,
an A14B expert pair (run directory, both experts high-noise first, wrong order refused)."""
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from holocine_jax.data.dataset import decode_text, load_data_source, write_synthetic_dataset
from holocine_jax.world import FilmSpec, render_film
from holocine_jax.eval import job
from holocine_jax.cli import main
from holocine_jax.eval.metrics import METRIC_NAMES
from holocine_jax.sample.schedulers import make_scheduler
from holocine_jax.train.metrics import read_metrics
from holocine_jax.vae import make_vae
from sample.test_sampler import random_model, small_config


def eval_config():
    config = small_config(num_steps=2, batch_size=2, guidance_scale=2.0)
    config.video.num_frames = 17           # 5 latent frames: two shots of >= 2
    config.vae.kind = "dct"
    config.model.text_len = 96
    config.eval.num_films = 2
    return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    write_synthetic_dataset(out, 2, 0, eval_config())
    return out


def step_params(step, seed=0):
    """The parameters `save_steps` writes at `step`."""
    return jax.tree.map(lambda x: x * (1 + 0.1 * step), nnx.state(random_model(seed), nnx.Param))


def save_steps(path, config, steps, seed=0):
    """A training-style checkpoint directory: config.json + a params item per step."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    with ocp.CheckpointManager(path, item_names=("params",)) as manager:
        for step in steps:
            params = step_params(step, seed)
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()


def test_ground_truth_films_score_perfectly(dataset):
    config = eval_config()
    films, truths = job.eval_films(config, dataset)
    assert len(films) == 2 and all(t is not None for t in truths)
    for film, truth in zip(films, truths):
        assert film.cuts == tuple(s["start"] for s in truth[1:])
    source = load_data_source(dataset)
    clips = [render_film(FilmSpec.from_dict(json.loads(decode_text(source[i])["attributes"])),
                         height=64, width=64) for i in range(2)]
    got = job.score_films(config, clips, films, truths)
    for name in ("cut_precision", "cut_recall", "cut_exact", "identity_consistency",
                 "room_consistency", "entry_side_accuracy", "glass_accuracy", "framing_accuracy",
                 "text_alignment"):
        assert got[name] == 1.0, (name, got)


def test_run_eval_writes_each_step_once(tmp_path, dataset, capsys):
    config = eval_config()
    ckpt, work = str(tmp_path / "ckpt"), str(tmp_path / "work")
    save_steps(ckpt, config, [1, 2])
    results = job.run_eval(config, ckpt, dataset, work, progress=False)
    assert sorted(results) == [1, 2]
    for step in (1, 2):
        path = os.path.join(work, "eval", f"step_{step:08d}", "metrics.json")
        saved = json.load(open(path))
        assert saved["step"] == step and saved["metrics"] == results[step]
        assert set(saved["metrics"]) == set(METRIC_NAMES)
        for v in saved["metrics"].values():
            assert v is None or -1.0 <= v <= 1.0
        assert os.path.exists(os.path.join(work, "eval", f"step_{step:08d}", "film_001",
                                           "contact_sheet.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(work, "eval")))
    logged = read_metrics(os.path.join(work, "eval", "metrics.jsonl"))  # the same clu writer
    assert logged == {s: {f"eval/{k}": v for k, v in results[s].items() if v is not None}
                      for s in (1, 2)}
    stamp = os.path.getmtime(os.path.join(work, "eval", "step_00000001", "metrics.json"))
    assert job.run_eval(config, ckpt, dataset, work, progress=False) == {}  # all done: skipped
    save_steps(ckpt, config, [3])
    capsys.readouterr()
    assert sorted(job.run_eval(config, ckpt, dataset, work, progress=True)) == [3]
    shown = capsys.readouterr().err   # progress: what is skipped, each film, where metrics went
    assert "eval: 3 step point(s), 2 already scored" in shown
    assert re.search(r"eval: step_00000003: film 1/2 sampled.*\n.*film 2/2 sampled", shown)
    assert f"eval: step_00000003: scored, {work}/eval/step_00000003/metrics.json" in shown
    assert os.path.getmtime(os.path.join(work, "eval", "step_00000001", "metrics.json")) == stamp
    # Sampling is deterministic: step 1 again gives the same numbers.
    again = job.evaluate_checkpoint(config, ckpt, 1, *job.eval_films(config, dataset),
                                    str(tmp_path / "again"),
                                    stack=(*job.text_stack(config), make_vae(config)))
    assert again == results[1]


def test_bad_checkpoint(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        job.run_eval(eval_config(), str(tmp_path / "missing"), dataset, str(tmp_path / "w"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint step"):
        job.run_eval(eval_config(), str(tmp_path / "empty"), dataset, str(tmp_path / "w"))


def test_step_points_of_an_expert_pair():
    assert job.step_points([[1, 2, 3]]) == [(1,), (2,), (3,)]
    assert job.step_points([[0, 500, 1000], [500, 1000]]) == [(500, 500), (1000, 1000)]
    assert job.step_points([[500, 1000], [0]]) == [(1000, 0)]   # fine-tuned high + imported low
    assert job.point_name((5, 5)) == (5, "step_00000005")
    assert job.point_name((1000, 0)) == ((1000, 0), "step_00001000_00000000")


def test_expert_pair_is_evaluated_with_both_experts(tmp_path, dataset, monkeypatch):
    config = eval_config()
    config.eval.num_films = 1
    config.experts.names, config.experts.boundary = ("high", "low"), 0.875
    # 2 Euler steps, shift 5: t = 1000 (high-noise expert), 833 (low-noise expert)
    assert make_scheduler("euler", num_steps=2, shift=5.0).expert_of_step(0.875, 2).tolist() == [0, 1]
    run = tmp_path / "run"   # `train --workdir run/high` and `run/low` write <expert>/checkpoints
    for expert, seed in (("high", 0), ("low", 1)):
        c = config.copy_and_resolve_references()
        c.expert = expert
        save_steps(str(run / expert / "checkpoints"), c, [2], seed=seed)
    high, low = (str(run / e / "checkpoints") for e in ("high", "low"))
    with pytest.raises(ValueError, match=r"go in the order high, low: .*low/checkpoints' holds the "
                                         r"'low' expert; .*high/checkpoints' holds the 'high' expert"):
        job.run_eval(config, [low, high], dataset, str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w").exists()
    sampled = []

    def generate(cfg, models, *args, **kwargs):
        sampled.append(models)
        return real_generate(cfg, models, *args, **kwargs)

    real_generate = job.generate
    monkeypatch.setattr(job, "generate", generate)
    work = str(tmp_path / "work")
    main(["eval", "--checkpoint", str(run), "--data", dataset, "--workdir", work])
    saved = json.load(open(os.path.join(work, "eval", "step_00000002", "metrics.json")))
    assert saved["experts"] == {"high": {"checkpoint": high, "step": 2},
                                "low": {"checkpoint": low, "step": 2}}
    assert set(saved["metrics"]) == set(METRIC_NAMES)
    assert os.path.exists(os.path.join(work, "eval", "step_00000002", "film_000", "film.mp4"))
    (models,) = sampled   # one sampling run, with the high-noise expert first
    for model, seed in zip(models, (0, 1)):
        for x, y in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(step_params(2, seed))):
            assert np.array_equal(x, y)
