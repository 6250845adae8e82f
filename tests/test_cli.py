"""The command line end to end: demo (then train resuming it), import -> export round trip, bad
input writes nothing."""
import json
import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import tiny_config
from convert.test_roundtrip import random_model
from holocine_jax.cli import main
from holocine_jax.convert import save_diffusers

TINY_F32 = ["--config", "tiny", "--config.model.dtype=float32"]


def test_demo_builds_data_trains_samples_and_scores(tmp_path, capsys):
    small = ["--num-films", "6", "--config.train.steps=4", "--config.train.batch_size=8",
             "--config.train.log_every=2", "--config.sample.num_steps=2",
             "--config.model.num_layers=1"]
    main(["demo", "--workdir", str(tmp_path), *small])
    out = capsys.readouterr().out
    assert "trained 4 steps" in out and "film.mp4" in out
    for path in ("film/film.mp4", "film/contact_sheet.png", "film/film.json", "film/metrics.json",
                 "train/metrics.jsonl", "data/build_report.json", "demo.json"):
        assert (tmp_path / path).exists(), path
    demo = json.load(open(tmp_path / "demo.json"))
    assert np.isfinite(demo["train"]["loss"]) and demo["metrics"]["cut_recall"] is not None
    film = json.load(open(tmp_path / "film" / "film.json"))
    assert len(film["cut_frames"]) >= 1 and film["num_frames"] == 33
    # A second run of the same workdir resumes: data kept, training already at its last step.
    main(["demo", "--workdir", str(tmp_path), *small])
    assert json.load(open(tmp_path / "demo.json"))["train"]["start_step"] == 4
    # `train` runs the same training on the demo's dataset: resumed at the last step, nothing to do.
    main(["train", "--workdir", str(tmp_path / "train"), "--data", str(tmp_path / "data"), *small[2:]])
    assert "trained steps 4 -> 4" in capsys.readouterr().out


def test_import_then_export_round_trips(tmp_path, capsys):
    model = random_model(tiny_config())
    src = save_diffusers(model, str(tmp_path / "src"))
    main(["import", *TINY_F32, "--format", "diffusers", "--src", src, "--out", str(tmp_path / "ckpt")])
    assert "imported diffusers weights" in capsys.readouterr().out
    main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "official",
          "--out", str(tmp_path / "official")])
    main(["import", *TINY_F32, "--format", "official", "--src", str(tmp_path / "official"),
          "--out", str(tmp_path / "ckpt2")])
    main(["export", "--checkpoint", str(tmp_path / "ckpt2"), "--format", "diffusers",
          "--out", str(tmp_path / "back")])
    a = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_import_of_bad_checkpoint_writes_nothing(tmp_path):
    src = save_diffusers(random_model(tiny_config()), str(tmp_path / "src"))
    weights = os.path.join(src, "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    tensors["blocks.0.ffn.net.2.weight"] = tensors["blocks.0.ffn.net.2.weight"][:, :5]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.net\.2\.weight: got \[64, 5\], expected \[64, 128\]"):
        main(["import", *TINY_F32, "--format", "diffusers", "--src", src, "--out", str(tmp_path / "ckpt")])
    assert not os.path.exists(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_unknown_override_is_named(tmp_path):
    with pytest.raises(KeyError, match="num_layer"):
        main(["demo", "--workdir", str(tmp_path), "--config.model.num_layer=2"])
    with pytest.raises(SystemExit):
        main(["demo", "--workdir", str(tmp_path), "--bogus"])
