"""`data encode`: cached latents + text states, resumable, readable as a random-access source."""
import os
import shutil

import numpy as np
import pytest

from holocine_jax import prompts
from holocine_jax.config import load_config
from holocine_jax.data.dataset import (build_dataset, clip_frames, decode_text, load_data_source,
                                       write_synthetic_dataset)
from holocine_jax.data.encode import cache_dir, encode_dataset, load_cached_source
from holocine_jax.text import encode_text, tiny_text_encoder, world_tokenizer
from holocine_jax.vae import make_vae, normalize_latents

NUM_FILMS = 5


@pytest.fixture(scope="module")
def config():
    return load_config("tiny")


@pytest.fixture(scope="module")
def built(tmp_path_factory, config):
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(str(out), num_films=NUM_FILMS, seed=3, config=config)
    return out


@pytest.fixture
def dataset(built, tmp_path):
    """A fresh copy of the built dataset (the cache is written inside it)."""
    return str(shutil.copytree(built, tmp_path / "data"))


@pytest.fixture(scope="module")
def stack(config):
    return dict(vae=make_vae(config), text_encoder=tiny_text_encoder(config), tokenizer=world_tokenizer())


class Interrupt(Exception):
    pass


class FailingVAE:
    """The tiny VAE, raising on its `fail_at`-th encode call (an injected crash)."""

    def __init__(self, vae, fail_at):
        self.vae, self.fail_at, self.calls = vae, fail_at, 0

    def encode(self, video):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupt
        return self.vae.encode(video)


def records(data_dir):
    source = load_cached_source(data_dir)
    return [source[i] for i in range(len(source))]


def assert_same_records(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            np.testing.assert_array_equal(ra[key], rb[key], err_msg=key)


def test_interrupted_and_resumed_equals_one_run(built, tmp_path, config, stack, capsys):
    once, resumed = (str(shutil.copytree(built, tmp_path / name)) for name in ("once", "resumed"))
    kw = dict(batch_size=2, records_per_file=2)
    report = encode_dataset(once, config, **stack, **kw)
    assert report["files_written"] == 3 and "5/5 records done" in capsys.readouterr().out

    failing = FailingVAE(stack["vae"], fail_at=3)  # files 0, 1: calls 1, 2; file 2 crashes
    with pytest.raises(Interrupt):
        encode_dataset(resumed, config, **dict(stack, vae=failing), **kw)
    written = sorted(f for f in os.listdir(cache_dir(resumed)) if f.endswith(".array_record"))
    assert written == ["cached-000000000-000000002.array_record",
                       "cached-000000002-000000004.array_record"]
    with open(os.path.join(cache_dir(resumed), "cached-000000004-000000005.array_record.tmp"), "wb") as f:
        f.write(b"partial file of a killed run")
    with pytest.raises(FileNotFoundError, match="incomplete.*1 of 3 files missing"):
        load_cached_source(resumed)

    counting = FailingVAE(stack["vae"], fail_at=0)
    report = encode_dataset(resumed, config, **dict(stack, vae=counting), **kw)
    assert (report["files_skipped"], report["files_written"], counting.calls) == (2, 1, 1)
    assert_same_records(records(once), records(resumed))


def test_records_hold_latents_text_states_and_windows(dataset, config, stack):
    encode_dataset(dataset, config, **stack, batch_size=3, records_per_file=4, progress=False)
    source, cached = load_data_source(dataset), load_cached_source(dataset)
    assert len(cached) == NUM_FILMS
    text_len = config.model.text_len
    for i in (0, NUM_FILMS - 1):
        ex, rec = decode_text(source[i]), cached[i]
        video = ex["video"][None].astype(np.float32) / 127.5 - 1.0
        want = np.asarray(normalize_latents(stack["vae"].encode(video), config))[0]
        np.testing.assert_allclose(rec["latents"], want, atol=1e-5 * np.abs(want).max())
        prompt = prompts.build_prompt(ex["global_caption"], ex["shot_captions"])
        states, _, mask = encode_text(stack["text_encoder"], stack["tokenizer"], [prompt], text_len)
        assert rec["text_states"].shape == (text_len, config.model.text_dim)
        np.testing.assert_allclose(rec["text_states"], np.asarray(states)[0], atol=1e-5)
        windows = prompts.text_windows(prompt, stack["tokenizer"], num_shots=ex["num_shots"],
                                       text_len=text_len)
        np.testing.assert_array_equal(rec["text_windows"], windows.windows)
        assert rec["text_pad_start"] == windows.pad_start and rec["num_text_tokens"] == mask.sum()
        np.testing.assert_array_equal(rec["cut_frames"], ex["cut_frames"])
        assert (rec["index"], rec["num_shots"], rec["num_frames"]) == (i, ex["num_shots"],
                                                                       config.video.num_frames)


def test_an_mp4_stored_dataset_encodes_its_decoded_clips(built, tmp_path, config, stack):
    mp4 = str(tmp_path / "mp4")
    build_dataset(str(built / "manifest.jsonl"), mp4,
                  load_config("tiny", ["--config.data.storage=mp4"]), progress=False)
    encode_dataset(mp4, config, **stack, batch_size=NUM_FILMS, progress=False)
    source = load_data_source(mp4)
    video = np.stack([clip_frames(source[i]["video"], "mp4") for i in range(NUM_FILMS)])
    want = np.asarray(normalize_latents(stack["vae"].encode(video / 127.5 - 1.0), config))
    got = np.stack([r["latents"] for r in records(mp4)])
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_hosts_split_files_and_changed_settings_refused(dataset, config, stack):
    kw = dict(stack, batch_size=2, records_per_file=2, progress=False)
    first = encode_dataset(dataset, config, **kw, process_index=0, process_count=2)
    second = encode_dataset(dataset, config, **kw, process_index=1, process_count=2)
    assert (first["files_written"], second["files_written"]) == (2, 1)
    assert len(load_cached_source(dataset)) == NUM_FILMS

    other = load_config("tiny", ["--config.model.text_len=96"])
    with pytest.raises(ValueError, match=r"different settings \(text_len\).*overwrite=True"):
        encode_dataset(dataset, other, **kw)
    report = encode_dataset(dataset, other, **kw, overwrite=True)
    assert report["files_written"] == 3
    assert load_cached_source(dataset)[0]["text_states"].shape[0] == 96


def test_missing_cache_is_named(dataset):
    with pytest.raises(FileNotFoundError, match="no encoded cache.*data encode --data"):
        load_cached_source(dataset)
