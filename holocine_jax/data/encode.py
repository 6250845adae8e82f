"""Cached latents + text states for a built dataset (`holocine-jax data encode`, DESIGN §9).

    report = encode_dataset("/data/clips", config, batch_size=4)   # resumable; prints progress
    source = load_cached_source("/data/clips")                      # len(source), source[i] -> dict

The cache lives in `<data_dir>/encoded/`: `info.json` (record count, file size, the encoders'
fingerprint) and ArrayRecord files `cached-<first>-<end>.array_record` holding the records
[first, end) of the dataset's `train` split in order. A file is written under a temporary name and
renamed when complete, so a file that exists is done: re-running encodes only the missing ones.
Records are the same whether or not a run was interrupted (batches never straddle files).

Each stored record (flax msgpack): `index` int64, `latents` float32 [F, h, w, z] (normalised with
config.vae's statistics), `text_states` float32 [n, D] (the n real tokens only), `num_text_tokens`
n, `text_windows` int32 [K+1, 2], `text_pad_start`, `cut_frames` int32 [K-1], `num_shots`,
`num_frames` (pixel frames T). `load_cached_source` returns them with `text_states` zero-padded
to text_len, i.e. what `prompts.text_windows` / `ShotLayout.from_cuts` and the DiT take.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization

from holocine_jax import files, prompts
from holocine_jax.data.dataset import (clip_frames, dataset_storage, decode_text,
                                       load_data_source)
from holocine_jax.data.video import to_unit_range
from holocine_jax.files import atomic_file

CACHE_DIR = "encoded"
INFO = "info.json"


def cache_dir(data_dir: str) -> str:
    return os.path.join(data_dir, CACHE_DIR)


def _file_name(first: int, end: int) -> str:
    return f"cached-{first:09d}-{end:09d}.array_record"


def _fingerprint(config, vae, text_encoder, tokenizer) -> dict:
    """What the cached values depend on (JSON-normalised)."""
    fp = dict(vae=config.vae.to_dict(), text=config.text.to_dict(), vae_class=type(vae).__name__,
              text_encoder_class=type(text_encoder).__name__, vocab_size=tokenizer.get_vocab_size())
    return json.loads(json.dumps(fp))


def _flat(info: dict) -> dict:
    return {**{k: v for k, v in info.items() if k != "fingerprint"},
            **{f"fingerprint.{k}": v for k, v in info["fingerprint"].items()}}


def _check_info(path: str, info: dict) -> None:
    old, new = _flat(json.loads(files.read_text(path))), _flat(info)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"{path} was written with different settings ({', '.join(diff)}); "
                         "re-encode from scratch with overwrite=True (`data encode --overwrite`)")


def _encode_batch(examples: list[dict], indices, config, vae, text_encoder, tokenizer) -> list[dict]:
    """Cached records of decoded source examples (all with the same video shape)."""
    from holocine_jax.text import encode_text
    from holocine_jax.vae import normalize_latents

    video = to_unit_range(np.stack([e["video"] for e in examples]))
    latents = np.asarray(normalize_latents(vae.encode(video), config), np.float32)
    texts = [prompts.build_prompt(e["global_caption"], e["shot_captions"]) for e in examples]
    states, _, mask = encode_text(text_encoder, tokenizer, texts, config.model.text_len)
    states = np.asarray(states, np.float32)
    records = []
    for j, (e, index, text) in enumerate(zip(examples, indices, texts)):
        try:
            windows = prompts.text_windows(text, tokenizer, num_shots=int(e["num_shots"]),
                                           text_len=config.model.text_len)
        except ValueError as err:
            raise ValueError(f"record {index} ({e['source']}): {err}") from None
        n = int(mask[j].sum())
        records.append(dict(index=np.int64(index), latents=latents[j], text_states=states[j, :n],
                            num_text_tokens=n, text_windows=windows.windows,
                            text_pad_start=int(windows.pad_start),
                            cut_frames=np.asarray(e["cut_frames"], np.int32),
                            num_shots=int(e["num_shots"]), num_frames=int(e["video"].shape[0])))
    return records


def encode_dataset(data_dir: str, config, *, vae=None, text_encoder=None, tokenizer=None,
                   batch_size: int = 1, records_per_file: int = 256, overwrite: bool = False,
                   progress: bool = True, process_index: int = 0, process_count: int = 1) -> dict:
    """Fill `<data_dir>/encoded/` with cached latents + text states for every record.

    vae: `.encode(video [B, T, H, W, 3] in [-1, 1]) -> [B, F, h, w, z]` (default make_vae(config));
    text_encoder / tokenizer default to `text.load_text_stack(config)`. Files already written are
    skipped (a changed fingerprint is an error unless overwrite=True). On several hosts, host p
    encodes files p, p + process_count, ...
    Returns {"records", "files", "files_written", "files_skipped", "cache_dir"}.
    """
    if batch_size < 1 or records_per_file < 1:
        raise ValueError(f"batch_size ({batch_size}) and records_per_file ({records_per_file}) must be >= 1")
    if vae is None:
        from holocine_jax.vae import make_vae
        vae = make_vae(config)
    if text_encoder is None or tokenizer is None:
        from holocine_jax.text import load_text_stack
        default_tokenizer, default_encoder = load_text_stack(config)
        tokenizer, text_encoder = tokenizer or default_tokenizer, text_encoder or default_encoder
    source, storage = load_data_source(data_dir), dataset_storage(data_dir)
    out = cache_dir(data_dir)
    if overwrite and files.isdir(out) and process_index == 0:
        files.rmtree(out)
    files.makedirs(out)
    info = dict(num_records=len(source), records_per_file=records_per_file,
                text_len=config.model.text_len,
                fingerprint=_fingerprint(config, vae, text_encoder, tokenizer))
    info_path = os.path.join(out, INFO)
    if files.exists(info_path):
        _check_info(info_path, info)
    elif process_index == 0:
        with atomic_file(info_path) as tmp:
            _write_json(tmp, info)
    ranges = [(a, min(a + records_per_file, len(source))) for a in range(0, len(source), records_per_file)]
    mine = ranges[process_index::process_count]
    total = sum(end - first for first, end in mine)
    written = skipped = done = encoded = 0
    if progress:
        print(f"data encode: {total} records in {len(mine)} file(s) of up to {records_per_file} "
              f"-> {out} (files already written are kept)", flush=True)
    start = time.time()
    for first, end in mine:
        path = os.path.join(out, _file_name(first, end))
        done += end - first
        if files.exists(path):
            skipped += 1
            continue
        records = []
        for a in range(first, end, batch_size):
            idx = range(a, min(a + batch_size, end))
            examples = [decode_text(source[i]) for i in idx]
            for e in examples:
                e["video"] = clip_frames(e["video"], storage)
            records += _encode_batch(examples, idx, config, vae, text_encoder, tokenizer)
        with atomic_file(path) as tmp:  # readers never see a partial file
            _write_records(tmp, records)
        written += 1
        encoded += end - first
        if progress:
            print(f"data encode: {done}/{total} records done, wrote {os.path.basename(path)} "
                  f"({encoded / (time.time() - start):.2f} records/s)", flush=True)
    return dict(records=len(source), files=len(ranges), files_written=written, files_skipped=skipped,
                cache_dir=out)


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def _write_records(path: str, records: list[dict]) -> None:
    writer = ArrayRecordWriter(path, "group_size:1")
    for r in records:
        writer.write(serialization.msgpack_serialize(r))
    writer.close()


class CachedSource:
    """Random access to a complete cache: `len(source)`, `source[i]` -> dict of numpy values
    (`text_states` float32 [text_len, D], zero past `num_text_tokens`)."""

    def __init__(self, data_dir: str):
        out = cache_dir(data_dir)
        info_path = os.path.join(out, INFO)
        if not files.exists(info_path):
            raise FileNotFoundError(f"{data_dir!r} has no encoded cache ({info_path}); run "
                                    f"`holocine-jax data encode --data {data_dir}`")
        self.info = json.loads(files.read_text(info_path))
        n, per = self.info["num_records"], self.info["records_per_file"]
        names = [_file_name(a, min(a + per, n)) for a in range(0, n, per)]
        present = set(files.listdir(out))
        missing = [name for name in names if name not in present]
        if missing:
            raise FileNotFoundError(f"the encoded cache of {data_dir!r} is incomplete ({len(missing)} of "
                                    f"{len(names)} files missing, e.g. {missing[0]}); re-run "
                                    f"`holocine-jax data encode --data {data_dir}`")
        self.text_len = self.info["text_len"]
        local = files.local_copy(out)   # ArrayRecord reads local files (gs://: a mirror)
        self._source = ArrayRecordDataSource([os.path.join(local, n) for n in names]) if names else []

    def __len__(self) -> int:
        return self.info["num_records"]

    def __getitem__(self, i: int) -> dict:
        r = serialization.msgpack_restore(self._source[i])
        states = np.zeros((self.text_len, r["text_states"].shape[-1]), np.float32)
        states[: r["num_text_tokens"]] = r["text_states"]
        return dict(r, text_states=states)


def load_cached_source(data_dir: str) -> CachedSource:
    """The cached records of `data_dir` (after `encode_dataset`), in the dataset's order."""
    return CachedSource(data_dir)
