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
from holocine_jax.eval.scorers import load_scorers
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
    config.eval.cut_detector = "frame_difference"   # TransNetV2 on films: test_transnet / prompts
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
    assert re.search(r"eval: step_00000003: film 1/2 sampled and scored.*\n.*film 2/2", shown)
    assert (f"eval: step_00000003: scored 2 new of 2 films, {work}/eval/step_00000003/metrics.json"
            in shown)
    assert os.path.getmtime(os.path.join(work, "eval", "step_00000001", "metrics.json")) == stamp
    # Sampling is deterministic: step 1 again gives the same numbers.
    again = job.evaluate_checkpoint(config, ckpt, 1, *job.eval_films(config, dataset),
                                    str(tmp_path / "again"),
                                    stack=(*job.text_stack(config), make_vae(config)),
                                    scorers=load_scorers(config))
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


BENCH = [
    {"global_caption": "[character1] is a red circle in a studio.",
     "shots": ["Wide shot: [character1] enters from the left.", "Close-up: a glass on a table."],
     "cuts": [9], "frames": 17, "seed": 3},
    {"global_caption": "An office.", "shots": ["Wide shot: a table.", "Close-up: a lamp."],
     "cuts": [9], "frames": 17, "seed": 4},
    {"global_caption": "[character1] a square; [character2] a circle.",
     "shots": ["[character1] walks.", "[character2] sits.", "[character1] waves."],
     "cuts": [5, 13], "frames": 17, "seed": 5},
    {"global_caption": "A bedroom.", "shots": ["Wide shot: a bed."], "frames": 17, "seed": 6},
]


def write_bench(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_prompt_file_eval_writes_the_table_and_skips_scored_films(tmp_path, monkeypatch):
    config = eval_config()
    ckpt, work = str(tmp_path / "ckpt"), str(tmp_path / "work")
    save_steps(ckpt, config, [1])
    bench = write_bench(tmp_path / "bench.jsonl", BENCH)
    main(["eval", "--checkpoint", ckpt, "--prompts", bench, "--workdir", work,
          "--config.eval.cut_detector=frame_difference"])
    out = os.path.join(work, "eval", "step_00000001")
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["num_films"] == 4 and 0 < saved["metrics"]["shot_cut_accuracy"] <= 1
    film2 = json.load(open(os.path.join(out, "film_002", "metrics.json")))
    assert film2["cuts"] == [5, 13] and film2["request"]["seed"] == 5
    assert len(film2["values"]["inter_shot_consistency"]) == 1   # shots 1 and 3: [character1]
    table = open(os.path.join(work, "eval", "table.md")).read()
    header = table.splitlines()[0]
    assert header.index("SCA") < header.index("Inter-shot") < header.index("Subject") < \
        header.index("Background") < header.index("Aesthetic") < header.index("Global")
    assert "| step 00000001 |" in table and "frame-difference detector" in table
    # a fifth prompt: only it is sampled; the four scored films are read back
    sampled = []
    real_generate = job.generate
    monkeypatch.setattr(job, "generate", lambda cfg, models, tok, enc, vae, films, **kw: (
        sampled.extend(films) or real_generate(cfg, models, tok, enc, vae, films, **kw)))
    write_bench(bench, BENCH + [{**BENCH[1], "seed": 9}])
    job.run_eval(config, ckpt, None, work, prompts=bench, progress=False)
    assert [f.seed for f in sampled] == [9]
    assert json.load(open(os.path.join(out, "metrics.json")))["num_films"] == 5
    # a changed line whose film was scored before is refused, naming the folder
    write_bench(bench, [{**BENCH[0], "seed": 42}] + BENCH[1:] + [{**BENCH[1], "seed": 9}])
    with pytest.raises(ValueError, match="film_000 was scored for another film"):
        job.run_eval(config, ckpt, None, work, prompts=bench, progress=False)


@pytest.mark.parametrize("line,field", [
    ({**BENCH[0], "shots": ["[charcter1] walks.", "x"]}, r"bench.jsonl:2: shots\[0\]: malformed"),
    ({**BENCH[0], "global_caption": "[character 1 a circle"}, r"bench.jsonl:2: global_caption"),
    ({**BENCH[0], "cuts": ["nine"]}, r"bench.jsonl:2: .*cuts"),
])
def test_bad_prompt_lines_name_file_line_and_field(tmp_path, line, field):
    bench = write_bench(tmp_path / "bench.jsonl", [BENCH[1], line])
    with pytest.raises(ValueError, match=field):
        job.prompt_films(bench)
