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
                 "train/metrics.jsonl", "data/build_report.json", "data/encoded/info.json",
                 "demo.json"):
        assert (tmp_path / path).exists(), path
    demo = json.load(open(tmp_path / "demo.json"))
    assert np.isfinite(demo["train"]["loss"]) and demo["metrics"]["cut_recall"] is not None
    assert set(demo["times"]) == {"data", "encode", "train", "sample", "score"}
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


def error_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip()], err


def test_user_errors_end_in_one_line_with_status_2(tmp_path, capsys):
    # a KeyError from a config override
    assert main(["demo", "--workdir", str(tmp_path), "--config.model.num_layer=2"], report_errors=True) == 2
    lines, err = error_lines(capsys)
    assert lines == ["holocine-jax demo: error: override '--config.model.num_layer=2': config.model "
                     "has no key 'num_layer'; did you mean num_layers, scan_layers?"]
    # a command's own usage check (SystemExit with a message): the command is named once
    assert main(["train", "--workdir", str(tmp_path / "w")], report_errors=True) == 2
    assert error_lines(capsys)[0] == ["holocine-jax train: error: give the dataset with --data DIR "
                                      "or --config.data.path=DIR"]
    # a missing file (FileNotFoundError), under a nested command; nothing written
    assert main(["data", "build", "--manifest", str(tmp_path / "no.jsonl"), "--out",
                 str(tmp_path / "out")], report_errors=True) == 2
    assert error_lines(capsys)[0] == [f"holocine-jax data build: error: manifest "
                                      f"{str(tmp_path / 'no.jsonl')!r} does not exist"]
    assert sorted(os.listdir(tmp_path)) == []


def test_debug_flag_or_environment_shows_the_traceback(tmp_path, capsys, monkeypatch):
    bad = ["demo", "--workdir", str(tmp_path), "--config.model.num_layer=2"]
    for argv in (["--debug", *bad], [*bad, "--debug"]):
        assert main(argv, report_errors=True) == 2
        lines, err = error_lines(capsys)
        assert err.startswith("Traceback (most recent call last):") and "KeyError" in err
        assert lines[-1].startswith("holocine-jax demo: error: override")
    monkeypatch.setenv("HOLOCINE_DEBUG", "1")
    assert main(bad, report_errors=True) == 2
    assert "Traceback" in capsys.readouterr().err


def test_console_script_reports_and_python_callers_get_the_exception(tmp_path, capsys, monkeypatch):
    bad = ["demo", "--workdir", str(tmp_path), "--config.model.num_layer=2"]
    monkeypatch.setattr("sys.argv", ["holocine-jax", *bad])
    assert main() == 2                                   # the console script: argv is None
    lines, err = error_lines(capsys)
    assert len(lines) == 1 and "Traceback" not in err
    with pytest.raises(KeyError, match="num_layer"):
        main(bad)


def test_bugs_keep_their_traceback(tmp_path, monkeypatch):
    """Only the rule's errors are reported in one line: a KeyError that no override raised, or a
    RuntimeError, propagates even with report_errors."""
    for exc in (KeyError("params"), RuntimeError("boom")):
        def broken(args, overrides, exc=exc):
            raise exc
        monkeypatch.setattr("holocine_jax.cli.cmd_demo", broken)
        with pytest.raises(type(exc)):
            main(["demo", "--workdir", str(tmp_path)], report_errors=True)


def test_corrupt_safetensors_import_is_one_line_naming_file_and_tensor(tmp_path, capsys):
    src = save_diffusers(random_model(tiny_config()), str(tmp_path / "src"))
    weights = os.path.join(src, "diffusion_pytorch_model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) - 100])          # a download cut short
    code = main(["import", *TINY_F32, "--format", "diffusers", "--src", src, "--out",
                 str(tmp_path / "ckpt")], report_errors=True)
    lines, _ = error_lines(capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"holocine-jax import: error: {weights} is not a readable safetensors "
                               "file: tensor '") and "(truncated)" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_demo_phase_prints_its_start_and_time(capsys):
    import time

    from holocine_jax.demo import phase

    times = {}
    with phase("train", times, "the tiny config"):
        time.sleep(0.05)
    assert error_lines(capsys)[0] == ["demo: train: the tiny config ...", "demo: train done (0s)"]
    assert 0.05 <= times["train"] < 5
