"""The Grain input pipeline: dataset records -> training batches (DESIGN §9).

    batches = make_pipeline("/data/synth", config, batch_size=8, seed=0, tokenizer=tok)
    batch = next(batches)        # {"video" | "latents", "input_ids", "attention_mask" |
                                 #  "text_states", "layout", "index"}, leading dim B
    # video: uint8 [B, T, H, W, 3], raw pixels; the batch encoder (train/step.py) turns them
    # into [-1, 1] floats on device (data.video.to_unit_range)
    state = batches.get_state()  # JSON-able; set_state(state) resumes exactly

Order of operations: random-access source (the TFDS ArrayRecord shards, or the `data encode`
cache when `cached=True`) -> this host's slice (`shard_index::shard_count`) -> seeded shuffle,
reshuffled every epoch -> record read (ArrayRecord; zlib inflate of stored frames) and the
per-record transform (which decodes an "mp4"-storage clip with PyAV from memory, with
config.data.decode_threads FFmpeg threads), both in Grain worker processes -> batching and skip
accounting in the main process -> optional `jax.device_put` with the caller's sharding. The
dataset's storage is read from its feature spec (`dataset.dataset_storage`).

A record that cannot be read or turned into an example (corrupt bytes, cuts that do not fit,
a prompt longer than text_len, an mp4 that does not decode to config.video's frames:
`undecodable_video`, ...) is skipped, logged with its index and counted under
`data/skipped/<reason>` (`skip_counts()`, together with the dataset build's own counts); it never
stops training. The iterator state is Grain's position plus these counters.
"""
from __future__ import annotations

import collections
import json
import logging
import os

import grain
import jax
from absl import flags
from grain.multiprocessing import SharedMemoryArray
import numpy as np

from holocine_jax import files, prompts
from holocine_jax.data import dataset
from holocine_jax.data.video import VideoError
from holocine_jax.shots import ShotLayout

log = logging.getLogger(__name__)


class _Skipped(dict):
    """The transform's answer for a record it could not use: {"reason", "index", "detail"}."""


class _SafeSource:
    """Random access that turns a read error into a `_Skipped` marker instead of raising."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        try:
            return (int(index), self.source[int(index)])
        except Exception as e:  # a corrupt record must never kill the run
            return (int(index), _Skipped(reason="unreadable_record", index=int(index), detail=repr(e)))


class ExampleTransform(grain.transforms.Map):
    """(index, record) -> one example of the batch contract (no batch dim), or `_Skipped`.

    storage: how the records hold `video` ("frames" | "mp4", `dataset.dataset_storage`).
    shared_memory (in Grain workers): decode mp4 clips straight into shared memory, which Grain
    hands to the main process without the copy it makes of other arrays.
    """

    def __init__(self, config, tokenizer=None, cached: bool = False, storage: str = "frames",
                 shared_memory: bool = False):
        self.config, self.tokenizer, self.cached, self.storage = config, tokenizer, cached, storage
        self.shared_memory = shared_memory

    def map(self, item):
        index, record = item
        if isinstance(record, _Skipped):
            return record
        buffers = []  # shared memory made for this record: freed if it is skipped
        try:
            return self._example(index, record, buffers)
        except VideoError as e:
            skipped = _Skipped(reason="undecodable_video", index=index, detail=str(e))
        except ValueError as e:
            skipped = _Skipped(reason="invalid_example", index=index, detail=str(e))
        except (KeyError, TypeError) as e:
            skipped = _Skipped(reason="malformed_record", index=index, detail=repr(e))
        for buffer in buffers:  # now: the error's traceback may keep the array alive a while
            buffer.shm.unlink()
        return skipped

    def _example(self, index, r, buffers: list) -> dict:
        c = self.config
        cuts = [int(x) for x in np.asarray(r["cut_frames"]).reshape(-1)]
        out = dict(index=np.int64(index))
        windows = pad_start = None
        if self.cached:
            num_frames = int(r["num_frames"])
            out["latents"] = np.asarray(r["latents"], np.float32)
            out["text_states"] = np.asarray(r["text_states"], np.float32)
            windows, pad_start = np.asarray(r["text_windows"]), int(r["text_pad_start"])
        else:
            def alloc(shape, dtype):
                if not self.shared_memory:
                    return np.empty(shape, dtype)
                buffers.append(SharedMemoryArray(shape, dtype))
                return buffers[-1]

            name = f"record {index}"
            video = dataset.clip_frames(r["video"], self.storage, name=name, alloc=alloc,
                                        threads=int(c.data.decode_threads))
            want = (c.video.num_frames, c.video.height, c.video.width, 3)
            if self.storage == "mp4" and video.shape != want:
                raise VideoError(name, "decode_error", f"decoded {video.shape}, config.video "
                                 f"needs {want}")
            if video.dtype != np.uint8 or video.ndim != 4 or video.shape[1:] != want[1:]:
                raise ValueError(f"{name}: frames {video.dtype} {video.shape} are not uint8 "
                                 f"[T, {c.video.height}, {c.video.width}, 3] (config.video)")
            num_frames = video.shape[0]
            out["video"] = video  # uint8: 4x fewer bytes across the worker boundary than float32
            if self.tokenizer is not None:
                from holocine_jax.text import tokenize

                captions = [x.decode() if isinstance(x, bytes) else str(x) for x in r["shot_captions"]]
                glob = r["global_caption"]
                prompt = prompts.build_prompt(glob.decode() if isinstance(glob, bytes) else glob, captions)
                ids, mask = tokenize(self.tokenizer, [prompt], c.model.text_len)
                out["input_ids"], out["attention_mask"] = ids[0], mask[0]
                tw = prompts.text_windows(prompt, self.tokenizer, num_shots=len(cuts) + 1,
                                          text_len=c.model.text_len)
                windows, pad_start = tw.windows, tw.pad_start
        out["layout"] = ShotLayout.for_config(c, cuts, num_frames=num_frames, text_windows=windows,
                                              text_pad_start=pad_start)
        return out


def _stack(examples: list[dict]) -> dict:
    """Examples -> a batch dict with a leading batch dim (layouts via ShotLayout.stack)."""
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "layout"}
    layouts = [e["layout"] for e in examples]
    batch["layout"] = jax.tree.map(lambda *xs: np.stack(xs), *layouts)
    return batch


class DataPipeline:
    """Iterator of batches with `get_state()` / `set_state()` and `skip_counts()`.

    num_workers > 0: records are read, decoded and transformed in that many Grain processes,
    together holding up to `prefetch` batches of examples ready (uint8 frames in shared memory).
    read_threads > 0: that many threads read and transform records in each process that does
    (the main one with no workers), holding up to `prefetch` batches ahead; PyAV decodes and
    zlib inflates without the GIL, so threads use several cores without the shared-memory
    copies that worker processes cost (at 33x480x832, ~40 MiB a film, more than the decode).
    """

    def __init__(self, dataset: grain.MapDataset, *, batch_size: int, num_workers: int,
                 prefetch: int = 2, read_threads: int = 0, sharding=None,
                 build_skips: dict | None = None):
        self.batch_size, self.sharding = int(batch_size), sharding
        # Not Grain's default read options (16 threads, 500 records ahead per process): sized
        # for KiB records, with video records they hold GBs per process.
        ahead = max(1, int(prefetch)) * self.batch_size  # records in `prefetch` batches
        iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=int(read_threads),
                                                            prefetch_buffer_size=ahead))
        if num_workers > 0:
            if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; not run by absl.app
                flags.FLAGS.mark_as_parsed()
            iter_ds = iter_ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=-(-ahead // num_workers)))
        self._iter = iter(iter_ds)
        self._skipped: collections.Counter = collections.Counter()
        self._build_skips = dict(build_skips or {})

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        examples = []
        while len(examples) < self.batch_size:
            item = next(self._iter)  # StopIteration ends the data (num_epochs reached)
            if isinstance(item, _Skipped):
                self._skipped[item["reason"]] += 1
                log.warning("skipping record %d (%s): %s", item["index"], item["reason"], item["detail"])
                continue
            examples.append(item)
        batch = _stack(examples)
        return batch if self.sharding is None else jax.device_put(batch, self.sharding)

    def close(self) -> None:
        """Stop the worker processes (also done when the pipeline is garbage collected)."""
        self._iter.close()

    def get_state(self) -> dict:
        return dict(grain=self._iter.get_state(), skipped=dict(self._skipped))

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state["grain"])
        self._skipped = collections.Counter(state.get("skipped", {}))

    def skip_counts(self) -> dict[str, int]:
        """{"data/skipped/<reason>": n}: records skipped while iterating plus at build time."""
        counts = collections.Counter(self._build_skips) + self._skipped
        return {f"data/skipped/{k}": int(v) for k, v in sorted(counts.items())}


def make_pipeline(data_dir: str, config, *, batch_size: int, seed: int, tokenizer=None,
                  cached: bool = False, shard_index: int | None = None,
                  shard_count: int | None = None, num_epochs: int | None = None,
                  sharding=None) -> DataPipeline:
    """Batches of this host's share of `data_dir`, shuffled with `seed`, for `num_epochs`
    (None: forever). `cached=True` reads the `data encode` cache (latents + text states);
    otherwise clips, tokenised with `tokenizer` when given. `sharding`: a jax Sharding for
    every batch leaf (leading dim B), e.g. NamedSharding(mesh, P(("data", "fsdp"))).
    """
    from holocine_jax.data.encode import load_cached_source

    shard_index = jax.process_index() if shard_index is None else int(shard_index)
    shard_count = jax.process_count() if shard_count is None else int(shard_count)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
    source = load_cached_source(data_dir) if cached else dataset.load_data_source(data_dir)
    storage = "frames" if cached else dataset.dataset_storage(data_dir)
    if len(source) < shard_count:
        raise ValueError(f"{data_dir!r} has {len(source)} records, fewer than {shard_count} hosts")
    ds = grain.MapDataset.source(_SafeSource(source))[shard_index::shard_count]
    workers = int(config.data.num_workers)
    transform = ExampleTransform(config, tokenizer, cached, storage, shared_memory=workers > 0)
    ds = ds.shuffle(seed=seed).repeat(num_epochs).map(transform)
    report = os.path.join(data_dir, "build_report.json")
    build_skips = json.loads(files.read_text(report)).get("skipped", {}) if files.exists(report) else {}
    return DataPipeline(ds, batch_size=batch_size, num_workers=workers,
                        prefetch=int(config.data.prefetch),
                        read_threads=int(config.data.read_threads), sharding=sharding,
                        build_skips=build_skips)
