"""`run_sample` end to end on a tiny checkpoint with the world text stack: files, bad input."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from holocine_jax.checkpoint import save_params
from holocine_jax.data.video import read_video
from holocine_jax.prompts import build_prompt
from holocine_jax.sample import run
from sample.test_sampler import random_model, small_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_params(random_model(0), str(tmp_path_factory.mktemp("ck") / "ckpt"), small_config())


def sample_config():
    config = small_config(num_steps=2, batch_size=2, guidance_scale=2.0, contact_columns=3)
    config.vae.kind = "dct"
    config.model.text_len = 96  # a 3-shot world prompt is ~67 word-level tokens
    return config


def prompt(n):
    shots = ["Wide shot: the circle enters from the left and stops beside an empty glass on a table.",
             "Close-up: the circle pours water into the glass.",
             "Wide shot: the circle stands beside the full glass."][:n]
    return build_prompt("A circle walks into a room, fills a glass with water and waits beside it.",
                        shots)


def test_prompt_file_films_written(tmp_path, checkpoint):
    path = tmp_path / "films.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in [
        dict(prompt=prompt(2), cuts=[5], seed=7),
        dict(prompt=prompt(3)),                               # even cuts, seed 0 + 1
    ]) + "\n")
    films = run.read_prompt_file(str(path))
    out = str(tmp_path / "out")
    written = run.run_sample(sample_config(), checkpoint, films, out, progress=False)
    assert sorted(os.listdir(out)) == ["film_000", "film_001"]
    for paths, shots, cuts, seed in zip(written, (2, 3), ([5], [5]), (7, 1)):
        info = json.load(open(paths["json"]))
        assert info["prompt"] == films[written.index(paths)].prompt and info["seed"] == seed
        assert info["sampler"]["num_steps"] == 2 and info["sampler"]["scheduler"] == "euler"
        assert read_video(paths["mp4"]).shape == (9, 32, 32, 3)
        sheet = np.asarray(Image.open(paths["contact_sheet"]))
        assert sheet.shape[0] == shots * (32 + 4) + (shots - 1) * 2   # a row per shot
    assert json.load(open(written[0]["json"]))["cut_frames"] == [5]
    assert json.load(open(written[1]["json"]))["cut_frames"] == [1, 5]  # even cuts of 9 frames


def test_bad_input(tmp_path, checkpoint):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(dict(prompt=prompt(2))) + "\n" +
                    json.dumps(dict(prompt=prompt(3), cuts=[5])) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: the prompt has 3 shot captions but 1 cuts"):
        run.read_prompt_file(str(path))
    path.write_text('{"prompt": "x", "cut": [5]}\n')
    with pytest.raises(ValueError, match=r":1: unknown keys \['cut'\]"):
        run.read_prompt_file(str(path))
    film = [run.FilmRequest(prompt(2), (5,))]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "other.txt").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        run.run_sample(sample_config(), checkpoint, film, str(busy))
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        run.run_sample(sample_config(), str(empty), film, str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        run.run_sample(sample_config(), str(tmp_path / "nope"), film, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
