"""`run_sample` end to end on a tiny checkpoint with the world text stack: files, bad input."""
import json
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

from holocine_jax.checkpoint import save_params
from holocine_jax.cli import build_parser, main
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


GLOBAL = "A circle walks into a room, fills a glass with water and waits beside it."
SHOTS = ["Wide shot: the circle enters from the left and stops beside an empty glass on a table.",
         "Close-up: the circle pours water into the glass.",
         "Wide shot: the circle stands beside the full glass."]


def prompt(n):
    return build_prompt(GLOBAL, SHOTS[:n])


def test_prompt_file_films_written(tmp_path, checkpoint, caplog):
    path = tmp_path / "films.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in [
        dict(prompt=prompt(2), cuts=[4], seed=7),              # 4 snaps to 5 (official rule)
        dict(global_caption=GLOBAL, shots=SHOTS),             # even cuts, seed 0 + 1
    ]) + "\n")
    films = run.read_prompt_file(str(path))
    assert films[1] == run.FilmRequest(prompt(3))
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="holocine_jax.sample.run"):
        written = run.run_sample(sample_config(), checkpoint, films, out, progress=False)
    assert "cuts [4] of a 9-frame film applied as [5]" in caplog.text
    assert sorted(os.listdir(out)) == ["film_000", "film_001"]
    for paths, shots, seed in zip(written, (2, 3), (7, 1)):
        info = json.load(open(paths["json"]))
        assert info["prompt"] == films[written.index(paths)].prompt and info["seed"] == seed
        assert info["sampler"]["num_steps"] == 2 and info["sampler"]["scheduler"] == "euler"
        assert read_video(paths["mp4"]).shape == (9, 32, 32, 3)
        sheet = np.asarray(Image.open(paths["contact_sheet"]))
        assert sheet.shape[0] == shots * (32 + 4) + (shots - 1) * 2   # a row per shot
    first, second = (json.load(open(w["json"])) for w in written)
    assert (first["requested_cuts"], first["cut_frames"], first["latent_cuts"]) == ([4], [5], [2])
    assert (second["requested_cuts"], second["cut_frames"]) == (None, [1, 5])  # even, 9 frames


def test_cli_builds_the_prompt_from_structured_captions(tmp_path, checkpoint):
    out = tmp_path / "cli"
    main(["sample", "--checkpoint", checkpoint, "--global-caption", GLOBAL, "--shot-caption",
          SHOTS[0], "--shot-caption", SHOTS[1], "--cuts", "6", "--seed", "3", "--out", str(out),
          "--config.sample.num_steps=1", "--config.vae.kind=dct", "--config.model.text_len=96"])
    info = json.load(open(out / "film.json"))
    assert (info["prompt"], info["seed"]) == (prompt(2), 3)
    assert (info["requested_cuts"], info["cut_frames"]) == ([6], [5])
    def sample(*argv):  # the command without main()'s error formatting
        args, rest = build_parser().parse_known_args(["sample", "--checkpoint", checkpoint,
                                                      "--out", str(tmp_path / "o"), *argv])
        return args.fn(args, rest)

    for argv, message in [
        (["--shot-caption", "x"], "--global-caption and --shot-caption go together"),
        (["--global-caption", "g"], "--global-caption and --shot-caption go together"),
        (["--global-caption", "g", "--shot-caption", "x", "--cuts", "5;9"],
         "--cuts must be comma-separated pixel frames, got '5;9'"),
        (["--global-caption", "g", "--shot-caption", "x", "--shot-caption", "y", "--cuts", "5,9"],
         "the prompt has 2 shot captions but 2 cuts give 3 shots"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            sample(*(["--prompt", prompt(1)] if argv[0] == "--shot-caption" else []), *argv)
    with pytest.raises(SystemExit):  # argparse: --prompt and --global-caption exclude each other
        sample("--prompt", prompt(1), "--global-caption", "g")
    assert not (tmp_path / "o").exists()


def test_structured_prompt_lines(tmp_path):
    path = tmp_path / "films.jsonl"

    def read(*lines):
        path.write_text("".join(json.dumps(d) + "\n" for d in lines))
        return run.read_prompt_file(str(path))

    objects = [dict(caption=SHOTS[0]), dict(caption=SHOTS[1], start=5)]
    assert read(dict(global_caption=GLOBAL, shots=objects, frames=9)) == [
        run.FilmRequest(prompt(2), (5,), 9)]
    assert read(dict(global_caption=GLOBAL, shot_captions=SHOTS[:2], cuts=[5]),
                dict(global_caption=GLOBAL, shots=SHOTS[:2], cuts=[5])) == [
        run.FilmRequest(prompt(2), (5,))] * 2
    for line, message in [
        (dict(global_caption=GLOBAL, shots=SHOTS, cuts=[5]),
         "3 shot captions for 2 shots (1 cuts)"),
        (dict(prompt=prompt(3), cuts=[5]),
         "the prompt has 3 shot captions but 1 cuts give 2 shots"),
        (dict(global_caption=GLOBAL, shots=[*objects, SHOTS[2]]), "give every shot after the first an integer 'start' (or none"),
        (dict(global_caption=GLOBAL, shots=objects, cuts=[5]), "'start' or as 'cuts', not both"),
        (dict(prompt=prompt(2), shots=SHOTS[:2]), "give 'prompt' or 'global_caption' with 'shots'"),
        (dict(prompt="A circle walks into a room."), "not a HoloCine prompt"),
        (dict(global_caption=GLOBAL), "needs 'shots'"),
        (dict(global_caption=GLOBAL, shots=SHOTS[:2], frames="9"), "'frames' must be an integer"),
        (dict(global_caption=GLOBAL, shots=SHOTS[:2], cuts=[5.5]), "'cuts' must be a list of int"),
    ]:
        with pytest.raises(ValueError, match=r"films\.jsonl:2: .*" + re.escape(message)):
            read(dict(prompt=prompt(1)), line)


def test_cuts_must_still_give_one_shot_per_caption():
    # 5 and 6 both snap to 5 at 9 frames: two cuts become one, three captions cannot fit.
    with pytest.raises(ValueError, match=re.escape(
            "cuts [5, 6] apply as [5] on the 4t+1 grid of 9 frames (nearest 4t+1, duplicates "
            "merged, cuts outside 1..8 dropped, as the official scripts): 2 shots, but the prompt "
            "has 3 shot captions")):
        run.film_cuts(run.FilmRequest(prompt(3), (5, 6)), 9)
    assert run.film_cuts(run.FilmRequest(prompt(3), (6, 2)), 9) == [1, 5]
    with pytest.raises(ValueError, match="num_frames=10 is not of the form 4t"):
        run.film_cuts(run.FilmRequest(prompt(2), (5,)), 10)
    with pytest.raises(ValueError, match="give the global caption and one caption per shot"):
        run.film_cuts(run.FilmRequest("A plain prompt."), 9)


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
