"""The evaluation job: per-step metrics.json + TensorBoard, done steps skipped, known answers."""
import json
import os

import jax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from holocine_jax.data.dataset import decode_text, load_data_source, write_synthetic_dataset
from holocine_jax.world import FilmSpec, render_film
from holocine_jax.eval import job
from holocine_jax.eval.metrics import METRIC_NAMES
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


def save_steps(path, config, steps):
    """A training-style checkpoint directory: config.json + a params item per step."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    with ocp.CheckpointManager(path, item_names=("params",)) as manager:
        for step in steps:
            params = jax.tree.map(lambda x: x * (1 + 0.1 * step),
                                  nnx.state(random_model(0), nnx.Param))
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


def test_run_eval_writes_each_step_once(tmp_path, dataset):
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
    assert sorted(job.run_eval(config, ckpt, dataset, work, progress=False)) == [3]
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
