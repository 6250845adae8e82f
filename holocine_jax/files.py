"""Paths: local or gs://, resolved in one place; all-or-nothing outputs.

    path = resolve("gs://bucket/run")              # a gs:// URL stays one; a local path -> absolute
    exists(path), isdir(path), listdir(path), makedirs(path), read_text(path), write_text(path, s)
    local = local_copy("gs://bucket/data/holocine_clips")   # readers that need local files
    with atomic_directory("gs://bucket/export") as tmp:     # write into tmp; published at the end
        ...
    with atomic_file("gs://bucket/run/config.json") as tmp: # write tmp; published at the end
        ...

gs:// goes through etils.epath (gcsfs underneath; the `gcsfs` package installs with this one).
orbax and tensorstore take gs:// URLs themselves. Local staging stands in for what GCS lacks:
a file is written locally and uploaded as one object (GCS publishes an object whole or not at
all), a directory is written locally and uploaded with its completion markers (`MARKERS`) last,
so a reader that checks them never takes a half-uploaded directory as complete. ArrayRecord reads
local files only: `local_copy` mirrors a gs:// tree under HOLOCINE_CACHE_DIR (default
~/.cache/holocine-jax) and refreshes files whose size changed (for datasets larger than the disk,
mount the bucket with gcsfuse and pass the mount path instead).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile

GCS = "gs://"
# Files whose presence says a directory is complete (checkpoint config, orbax step commit, TFDS
# dataset info, build report): uploaded after everything else.
MARKERS = ("config.json", "commit_success.txt", "_CHECKPOINT_METADATA", "dataset_info.json",
           "build_report.json", "info.json", "metrics.json")


def is_gcs(path) -> bool:
    return str(path).startswith(GCS)


def resolve(path) -> str:
    """The one spelling of a user's path: a gs:// URL (checked: bucket named, gcsfs installed)
    or an absolute local path."""
    path = os.fspath(path)
    if not is_gcs(path):
        return os.path.abspath(os.path.expanduser(path))
    if not path[len(GCS):].split("/")[0]:
        raise ValueError(f"{path!r}: a gs:// path names a bucket (gs://BUCKET/...)")
    if importlib.util.find_spec("gcsfs") is None:
        raise ImportError(f"{path!r}: gs:// paths need gcsfs (pip install gcsfs; it comes with "
                          "holocine-jax and its `tpu` extra)")
    return path.rstrip("/")


def _epath(path):
    from etils import epath

    _gcs_filesystem()
    return epath.Path(resolve(path))


def _gcs_filesystem():
    """gcsfs, configured once: no directory-listing cache (orbax/tensorstore and other hosts
    write behind its back; a cached listing would hide their files)."""
    import fsspec

    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
    return fsspec.filesystem("gs")


class GCSUnreachable(ConnectionError):
    """Google Cloud Storage (or the endpoint STORAGE_EMULATOR_HOST names) did not answer."""


def _on_gcs(path, op):
    """op(epath.Path of `path`), a failure to reach GCS raised as GCSUnreachable naming the path
    and the endpoint (gcsfs retries for ~40 s first; its connection errors are OSErrors)."""
    try:
        return op(_epath(path))
    except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
            NotADirectoryError):
        raise
    except OSError as e:
        endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"
        raise GCSUnreachable(f"{path}: cannot reach Google Cloud Storage at {endpoint}: "
                             f"{type(e).__name__}: {e}") from e


def exists(path) -> bool:
    return _on_gcs(path, lambda p: p.exists()) if is_gcs(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _on_gcs(path, lambda p: p.is_dir()) if is_gcs(path) else os.path.isdir(path)


def isfile(path) -> bool:
    return _on_gcs(path, lambda p: p.is_file()) if is_gcs(path) else os.path.isfile(path)


def listdir(path) -> list[str]:
    if is_gcs(path):
        return sorted(_on_gcs(path, lambda p: [c.name for c in p.iterdir()]))
    return sorted(os.listdir(path))


def makedirs(path) -> None:
    """Create a directory and its parents (gs://: nothing to do, GCS has no directories)."""
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)


def rmtree(path) -> None:
    if is_gcs(path):
        if exists(path):
            _on_gcs(path, lambda p: p.rmtree())
    else:
        shutil.rmtree(path, ignore_errors=True)


def read_text(path) -> str:
    if is_gcs(path):
        return _on_gcs(path, lambda p: p.read_text())
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path, text: str) -> None:
    """Write `text` all or nothing (atomic_file)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def upload(local: str, remote: str) -> None:
    """Copy a local file or directory tree to `remote` (a gs:// URL or a local path), completion
    markers (MARKERS) last."""
    if not os.path.isdir(local):
        _copy_file(local, remote)
        return
    files = [os.path.relpath(os.path.join(d, n), local) for d, _, names in os.walk(local)
             for n in names]
    for rel in sorted(files, key=lambda r: (os.path.basename(r) in MARKERS, r)):
        _copy_file(os.path.join(local, rel), f"{remote}/{rel.replace(os.sep, '/')}")


def _copy_file(local: str, remote: str) -> None:
    if is_gcs(remote):
        with open(local, "rb") as f:
            data = f.read()
        _on_gcs(remote, lambda p: p.write_bytes(data))   # one object: whole or absent
    else:
        os.makedirs(os.path.dirname(os.path.abspath(remote)), exist_ok=True)
        shutil.copyfile(local, remote)


def local_copy(path) -> str:
    """A local path with the contents of `path`: itself when local; for gs://, a mirror under
    HOLOCINE_CACHE_DIR (files whose size differs are downloaded again; progress on stderr)."""
    if not is_gcs(path):
        return path
    url = resolve(path)
    fs = _gcs_filesystem()
    dst = os.path.join(os.environ.get("HOLOCINE_CACHE_DIR")
                       or os.path.join(os.path.expanduser("~"), ".cache", "holocine-jax"),
                       "gcs", url[len(GCS):])
    found = _on_gcs(url, lambda _: fs.find(url, detail=True))   # {"bucket/key": info}, one listing
    if not found:
        raise FileNotFoundError(f"{path!r} does not exist (no object under it)")
    root = url[len(GCS):]
    fetched = 0
    for name, info in sorted(found.items()):
        rel = os.path.relpath(name, root) if name != root else ""
        target = os.path.join(dst, rel) if rel else dst
        if os.path.isfile(target) and os.path.getsize(target) == int(info["size"]):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with atomic_file(target) as tmp:
            fs.get_file(f"{GCS}{name}", tmp)
        fetched += 1
    if fetched:
        print(f"files: copied {fetched} of {len(found)} file(s) of {path} to {dst}",
              file=sys.stderr, flush=True)
    return dst


@contextlib.contextmanager
def atomic_directory(out: str):
    """Yield a temporary local directory to write `out` into; publish it as `out` only if the
    block succeeds (local: a rename; gs://: an upload, completion markers last).

    `out` must not exist or be an empty directory (FileExistsError otherwise, before anything is
    written); local parents are created. On failure the temporary directory is removed.
    """
    if isdir(out) and listdir(out) or (exists(out) and not isdir(out)):
        raise FileExistsError(f"output directory {out!r} exists and is not empty")
    if is_gcs(out):
        with staged_directory(out) as tmp:
            yield tmp
        return
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
def staged_directory(out: str):
    """Yield a local directory whose contents end up in `out`: `out` itself when local (created);
    for gs://, a temporary directory uploaded into `out` (markers last) if the block succeeds."""
    if not is_gcs(out):
        os.makedirs(out, exist_ok=True)
        yield out
        return
    tmp = tempfile.mkdtemp(prefix=".holocine-upload-")
    try:
        yield tmp
        upload(tmp, resolve(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary local path for the block to write; publish it as `path` (replacing an
    existing file) only if the block succeeds, so readers never see a partial file (local: a
    rename of `path + ".tmp"`; gs://: one object upload). On failure the temporary file is
    removed and `path` is left as it was."""
    if is_gcs(path):
        fd, tmp = tempfile.mkstemp(prefix=".holocine-upload-", suffix=os.path.basename(path))
        os.close(fd)
        try:
            yield tmp
            _copy_file(tmp, resolve(path))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
