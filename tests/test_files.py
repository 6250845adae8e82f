"""All-or-nothing outputs: a finished block renames, a failed one leaves nothing behind, and a
non-empty output directory is never written into."""
import os

import pytest

from holocine_jax.files import atomic_directory, atomic_file


class Boom(Exception):
    pass


def test_directory_appears_whole_on_success(tmp_path):
    out = tmp_path / "nested" / "out"          # parents are created
    with atomic_directory(str(out)) as tmp:
        assert not out.exists() and os.path.dirname(tmp) == str(out.parent)
        with open(os.path.join(tmp, "a.txt"), "w") as f:
            f.write("a")
    assert sorted(os.listdir(out)) == ["a.txt"] and (out / "a.txt").read_text() == "a"
    assert os.listdir(out.parent) == ["out"]   # no temporary sibling left


def test_directory_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Boom):
        with atomic_directory(str(out)) as tmp:
            with open(os.path.join(tmp, "a.txt"), "w") as f:
                f.write("a")
            raise Boom
    assert os.listdir(tmp_path) == []


def test_directory_refuses_existing_non_empty_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        with atomic_directory(str(out)):
            pytest.fail("the block must not run")
    (tmp_path / "file").write_text("x")        # a file where the directory should go
    with pytest.raises(FileExistsError):
        with atomic_directory(str(tmp_path / "file")):
            pytest.fail("the block must not run")
    assert sorted(os.listdir(tmp_path)) == ["file", "out"] and os.listdir(out) == ["keep.txt"]
    empty = tmp_path / "empty"                 # an existing empty directory is replaced
    empty.mkdir()
    with atomic_directory(str(empty)) as tmp:
        open(os.path.join(tmp, "b.txt"), "w").close()
    assert os.listdir(empty) == ["b.txt"]


def test_file_is_renamed_on_success_and_replaces_the_old_one(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with atomic_file(str(path)) as tmp:
        assert tmp != str(path) and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "w") as f:
            f.write("new")
        assert path.read_text() == "old"       # readers see the old file until the rename
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("existing", [None, "old"])
def test_file_failure_leaves_the_path_as_it_was(tmp_path, existing):
    path = tmp_path / "records.bin"
    if existing is not None:
        path.write_text(existing)
    with pytest.raises(Boom):
        with atomic_file(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise Boom
    assert os.listdir(tmp_path) == ([] if existing is None else ["records.bin"])
    if existing is not None:
        assert path.read_text() == existing


def test_an_uploaded_tree_sends_its_completion_markers_last(tmp_path, monkeypatch):
    """A reader that checks the markers (config.json, commit_success.txt, dataset_info.json, ...)
    must never see them before the files they vouch for."""
    from holocine_jax import files

    local = tmp_path / "run"
    for rel in ("config.json", "a/commit_success.txt", "a/x.bin", "b/dataset_info.json", "b/y", "z"):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text(rel)
    sent = []
    monkeypatch.setattr(files, "_copy_file", lambda src, dst: sent.append(os.path.relpath(src, local)))
    files.upload(str(local), "gs://bucket/run")
    markers = [r for r in sent if os.path.basename(r) in files.MARKERS]
    assert sorted(sent) == sorted(["config.json", "a/commit_success.txt", "a/x.bin",
                                   "b/dataset_info.json", "b/y", "z"])
    assert sent[-len(markers):] == markers and len(markers) == 3, sent
