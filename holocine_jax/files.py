"""All-or-nothing outputs: a directory or a file appears complete under its name, or not at all.

    with atomic_directory("out/ckpt") as tmp:      # write into tmp; renamed to out/ckpt at the end
        ...
    with atomic_file("out/metrics.json") as tmp:   # write tmp; renamed onto the path at the end
        ...
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_directory(out: str):
    """Yield a temporary sibling of `out`; rename it to `out` only if the block succeeds.

    `out` must not exist or be an empty directory (FileExistsError otherwise, before anything is
    written); its parents are created. On failure the temporary directory is removed.
    """
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"output directory {out!r} exists and is not empty")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path beside `path` (`path + ".tmp"`) for the block to write; rename it
    onto `path` (replacing an existing file) only if the block succeeds, so readers never see a
    partial file. On failure the temporary file is removed and `path` is left as it was."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
