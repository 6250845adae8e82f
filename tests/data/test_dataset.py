"""Manifest validation and the TFDS/ArrayRecord build: exact skip counts, ground-truth round trip."""
import json
import os

import numpy as np
import pytest

from holocine_jax.config import load_config
from holocine_jax import world
from holocine_jax.data.cuts import detect_cuts
from holocine_jax.data.dataset import (REPORT, BuildError, build_dataset, decode_text,
                                       load_data_source, write_synthetic_dataset)
from holocine_jax.data.manifest import FilmRecord, ManifestError, clip_cuts, parse_line
from holocine_jax.data.video import write_video


@pytest.fixture
def config():
    return load_config("tiny")  # 33 frames, 8 fps, 64x64, max_shots 4


def good_line(name, spec):
    shots = [dict(caption=s.caption, start=s.start) for s in spec.shots]
    return dict(video=name, global_caption=spec.global_caption, shots=shots, attributes=spec.to_dict())


def test_bad_input_manifest_builds_good_examples_and_counts_reasons(tmp_path, config):
    lines, specs = [], {}
    for i in range(3):                                     # 3 good films
        frames, spec = world.make_film(100 + i, num_frames=33, shot_range=(2, 4))
        write_video(str(tmp_path / f"good{i}.mp4"), frames, fps=8)
        specs[f"good{i}.mp4"] = spec
        lines.append(json.dumps(good_line(f"good{i}.mp4", spec)))
    frames, spec = world.make_film(200, num_frames=33, shot_range=(2, 4))
    write_video(str(tmp_path / "src.mp4"), frames, fps=8)
    data = (tmp_path / "src.mp4").read_bytes()
    # 2 truncated mp4s (PyAV writes moov last): moov lost -> corrupt; moov cut inside its sample
    # tables -> decode_error (fractions measured on this film: a re-render moves the boxes)
    for i, frac in enumerate((0.5, 0.93)):
        (tmp_path / f"trunc{i}.mp4").write_bytes(data[: int(len(data) * frac)])
        lines.append(json.dumps(good_line(f"trunc{i}.mp4", spec)))
    (tmp_path / "zero.mp4").write_bytes(b"")               # 1 zero-byte -> empty
    lines.append(json.dumps(good_line("zero.mp4", spec)))
    for i in range(2):                                     # 2 missing files
        lines.append(json.dumps(good_line(f"missing{i}.mp4", spec)))
    (tmp_path / "notes.mp4").write_text("hello\n" * 100)   # 1 non-video -> not_video
    lines.append(json.dumps(good_line("notes.mp4", spec)))
    write_video(str(tmp_path / "short.mp4"), frames[:17], fps=8)
    lines.append(json.dumps(dict(video="short.mp4", global_caption="g", shot_captions=["a", "b"],
                                 cuts=[9])))                # 1 too short for the 33-frame clip
    lines.append(json.dumps(dict(video="src.mp4", global_caption="g", shot_captions=["a", "b"],
                                 cuts=[40])))               # 1 cut past the video's 33 frames
    lines.append(json.dumps(dict(video="src.mp4", global_caption="g", shot_captions=["a", "b", "c"],
                                 cuts=[9])))                # caption/shot count mismatch x2
    lines.append(json.dumps(dict(video="src.mp4", global_caption="g", num_shots=3,
                                 shots=[dict(caption="a", start=0), dict(caption="b", start=9)])))
    lines += ['{"video": "src.mp4", "global_caption": ', "not json at all"]   # invalid JSON x2
    lines.insert(2, "")                                    # blank lines are ignored
    manifest = tmp_path / "films.jsonl"
    manifest.write_text("\n".join(lines) + "\n")

    out = str(tmp_path / "out")
    report = build_dataset(str(manifest), out, config)
    expected = dict(corrupt=1, decode_error=1, empty=1, missing=2, not_video=1, too_short=1, cuts_out_of_range=1,
                    caption_count_mismatch=2, invalid_json=2)
    assert report["examples"] == 3
    assert report["skipped"] == dict(sorted(expected.items()))
    with open(os.path.join(out, REPORT)) as f:
        assert json.load(f)["skipped"] == report["skipped"]
    paths = {os.path.basename(e["path"]) for e in report["skipped_files"] if e["reason"] == "missing"}
    assert paths == {"missing0.mp4", "missing1.mp4"}

    source = load_data_source(out)
    assert len(source) == 3
    for i in range(3):
        ex = decode_text(source[i])
        spec = specs[os.path.basename(ex["source"])]
        assert world.FilmSpec.from_dict(json.loads(ex["attributes"])) == spec   # ground truth survives
        assert ex["video"].shape == (33, 64, 64, 3) and ex["video"].dtype == np.uint8
        assert list(ex["cut_frames"]) == list(spec.cut_frames) and ex["num_shots"] == spec.num_shots
        assert ex["shot_captions"] == list(spec.shot_captions)
        assert ex["global_caption"] == spec.global_caption
        assert detect_cuts(ex["video"]) == list(spec.cut_frames)
        rendered = world.render_film(spec, height=64, width=64)
        assert np.abs(ex["video"].astype(np.int16) - rendered).mean() < 5.0

    with pytest.raises(BuildError, match="trunc0.mp4"):
        build_dataset(str(manifest), str(tmp_path / "strict"), config, strict=True)


def test_synthetic_dataset_is_deterministic_and_keeps_ground_truth(tmp_path, config):
    a = write_synthetic_dataset(str(tmp_path / "a"), 4, seed=3, config=config)
    b = write_synthetic_dataset(str(tmp_path / "b"), 4, seed=3, config=config)
    assert a["examples"] == b["examples"] == 4 and a["skipped"] == {}
    sa, sb = load_data_source(str(tmp_path / "a")), load_data_source(str(tmp_path / "b"))
    by_source = {os.path.basename(decode_text(sb[i])["source"]): decode_text(sb[i]) for i in range(4)}
    for i in range(4):  # TFDS orders examples by a salted key hash: match films by file name
        ea = decode_text(sa[i])
        eb = by_source[os.path.basename(ea["source"])]
        # Rendering is byte-exact; x264 is not always, so the decoded clips agree to < 0.5 levels.
        assert np.abs(ea["video"].astype(np.int16) - eb["video"]).mean() < 0.5
        spec = world.FilmSpec.from_dict(json.loads(ea["attributes"]))
        assert spec == world.sample_film(spec.seed, num_frames=33, shot_range=(2, 4))
        assert list(ea["cut_frames"]) == list(spec.cut_frames) and 2 <= spec.num_shots <= 4


def record(cuts, line=1):
    return FilmRecord(line, "v.mp4", "g", tuple("c" * (len(cuts) + 1)), tuple(cuts))


def test_clip_cuts_maps_resamples_snaps_and_drops():
    # Same fps: cuts on the 4t+1 grid pass through; off-grid cuts snap to the nearest 4t+1.
    assert clip_cuts(record([9, 21]), 33, 8.0, 8.0, 33, 4) == ((9, 21), 3)
    assert clip_cuts(record([10, 19]), 33, 8.0, 8.0, 33, 4) == ((9, 17), 3)
    # 24 fps source, 8 fps clip: source frame 27 -> clip frame 9; a shot past the clip is dropped.
    assert clip_cuts(record([27, 200]), 300, 24.0, 8.0, 33, 4) == ((9,), 2)
    with pytest.raises(ManifestError, match="cuts_out_of_range"):
        clip_cuts(record([9, 40]), 33, 8.0, 8.0, 33, 4)
    with pytest.raises(ManifestError, match="cuts_out_of_range"):
        clip_cuts(record([9, 10]), 33, 8.0, 8.0, 33, 4)   # both snap to 9
    with pytest.raises(ManifestError, match="too_many_shots"):
        clip_cuts(record([5, 9, 13, 17]), 33, 8.0, 8.0, 33, 4)


@pytest.mark.parametrize("text,reason", [
    ('[1, 2]', "bad_schema"),
    ('{"global_caption": "g", "shots": [{"caption": "a"}]}', "bad_schema"),
    ('{"video": "v.mp4", "global_caption": "g", "shots": []}', "bad_schema"),
    ('{"video": "v.mp4", "global_caption": "g", "shots": [{"caption": "a", "start": 3}]}', "bad_cuts"),
    ('{"video": "v.mp4", "global_caption": "g", "shot_captions": ["a", "b", "c"], "cuts": [9, 5]}',
     "bad_cuts"),
    ('{"video": "v.mp4", "global_caption": "g", "shot_captions": ["a"], "cuts": [9]}',
     "caption_count_mismatch"),
    ('{"video": "v.mp4", "global_caption": "g", "shots": [{"caption": 3, "start": 0}]}', "bad_schema"),
    ('{"video": "v.mp4", "shots": [{"caption": "a", "start": 0}', "invalid_json"),
])
def test_parse_line_reasons(text, reason):
    with pytest.raises(ManifestError) as e:
        parse_line(text, 7, "/root")
    assert e.value.reason == reason and e.value.line == 7 and "line 7" in str(e.value)


def test_parse_line_resolves_paths():
    r = parse_line('{"video": "a/v.mp4", "global_caption": "g", "shots": '
                   '[{"caption": "x", "start": 0}, {"caption": "y", "start": 9}]}', 1, "/data")
    assert (r.video, r.shot_captions, r.cut_frames, r.attributes) == ("/data/a/v.mp4", ("x", "y"), (9,), "")


def test_manifest_without_a_usable_film_is_one_error_naming_it_and_writes_nothing(tmp_path, config,
                                                                                   capsys):
    spec = world.sample_film(7, num_frames=33, shot_range=(2, 3))
    (tmp_path / "notes.mp4").write_text("hello\n" * 100)
    manifest = tmp_path / "films.jsonl"
    manifest.write_text("\n".join([json.dumps(good_line("missing.mp4", spec)),
                                   json.dumps(good_line("notes.mp4", spec)), "not json"]) + "\n")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(BuildError) as e:   # TFDS alone: `AssertionError: No examples were yielded`
        build_dataset(str(manifest), str(tmp_path / "out"), config)
    assert str(e.value) == (f"no usable film in manifest {str(manifest)!r}: 3 film line(s), skipped "
                            "{'invalid_json': 1, 'missing': 1, 'not_video': 1} (each is logged above "
                            "with its file)")
    assert sorted(os.listdir(tmp_path)) == before     # no out dir left behind
    (tmp_path / "keep").mkdir()                        # a directory that existed stays, empty
    with pytest.raises(BuildError):
        build_dataset(str(manifest), str(tmp_path / "keep"), config)
    assert os.listdir(tmp_path / "keep") == []
    assert "data build: 3/3 films read, 0 kept, 3 skipped" in capsys.readouterr().err


def test_build_prints_progress_counts(tmp_path, config, capsys):
    frames, spec = world.make_film(5, num_frames=33, shot_range=(2, 3))
    write_video(str(tmp_path / "a.mp4"), frames, fps=8)
    manifest = tmp_path / "films.jsonl"
    manifest.write_text(json.dumps(good_line("a.mp4", spec)) + "\n\n" + "{bad\n")
    report = build_dataset(str(manifest), str(tmp_path / "out"), config)
    assert report["examples"] == 1
    err = capsys.readouterr().err
    assert "data build: 2/2 films read, 1 kept, 1 skipped (" in err and " films/s)" in err
    build_dataset(str(manifest), str(tmp_path / "quiet"), config, progress=False)
    assert "data build:" not in capsys.readouterr().err


def test_an_unknown_storage_is_refused_before_anything_is_written(tmp_path):
    manifest = tmp_path / "films.jsonl"
    manifest.write_text('{"video": "a.mp4", "global_caption": "g", "shot_captions": ["a"]}\n')
    with pytest.raises(ValueError, match=r"config.data.storage must be one of \('frames', 'mp4'\)"):
        build_dataset(str(manifest), str(tmp_path / "out"),
                      load_config("tiny", ["--config.data.storage=webm"]))
    assert not (tmp_path / "out").exists()
