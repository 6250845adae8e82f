"""Caption dropout and validation films during training.

Caption dropout: a dropped film's loss is the loss of the model fed exactly what the sampler's
unconditional pass feeds it (the empty prompt encoded as `sample.run.encode_texts` encodes it,
the layout without text windows); kept films are untouched. Validation: a short tiny run writes
the validation film (an animated GIF), its contact sheet and val/ scalars, read back from the
TensorBoard event files with TensorBoard's own reader.
"""
import dataclasses
import glob
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from holocine_jax.config import load_config
from holocine_jax.eval.job import score_films
from holocine_jax.sample.run import encode_texts
from holocine_jax.shots import ShotLayout
from holocine_jax.text import load_text_stack
from holocine_jax.train import objective
from holocine_jax.train.loop import initial_model, run_training
from holocine_jax.train.state import init_train_state, split_model
from holocine_jax.train.step import empty_prompt_states, make_gradient_fn
from holocine_jax.vae import make_vae

OVERRIDES = ["model.num_layers=1", "video.num_frames=17", "attention.impl=reference",
             "train.log_every=1", "train.checkpoint_every=100", "train.warmup_steps=1",
             "train.caption_dropout=0.0", "train.validate_every=0",   # each test turns on its own
             "eval.cut_detector=frame_difference"]   # TransNetV2 has its own tests


def tiny(*more):
    return load_config("tiny", [f"--config.{o}" for o in OVERRIDES + list(more)])


def batch_of(config, b, seed):
    rng = np.random.default_rng(seed)
    layouts = [ShotLayout.from_latent_cuts(5, [2], latent_hw=(4, 4), max_shots=4,
                                           text_windows=[(0, 10), (10, 20), (20, 30)], text_pad_start=30)
               for _ in range(b)]
    return dict(latents=rng.standard_normal((b, 5, 8, 8, 16)).astype(np.float32),
                text_states=10 * rng.standard_normal((b, config.model.text_len, 32)).astype(np.float32),
                layout=ShotLayout.stack(layouts))


def test_dropped_films_train_on_what_the_sampler_feeds_the_unconditional_pass():
    config = tiny("train.caption_dropout=0.5")
    tokenizer, encoder = load_text_stack(config)
    empty = empty_prompt_states(config, tokenizer, encoder)
    np.testing.assert_array_equal(np.asarray(empty),   # the sampler's encoding of ""
                                  np.asarray(encode_texts(tokenizer, encoder, [""], 128))[0])
    model = initial_model(config)
    model.proj_out.kernel[...] = 0.1 * jnp.ones_like(model.proj_out.kernel[...])  # Wan zero-inits it
    graphdef, params, frozen, rest = split_model(model)
    state = init_train_state(config, params, frozen)
    batch = batch_of(config, 8, 0)
    # Random stand-in states for "" (the real ones are zero past one token, so the windows
    # would barely matter): a wrong text or wrong layout for dropped films shows in the loss.
    empty = 10 * np.random.default_rng(1).standard_normal((128, 32)).astype(np.float32)
    _, aux = jax.jit(make_gradient_fn(config, graphdef, rest))(
        state, dict(batch, empty_text_states=empty))
    dropped = np.asarray(aux["caption_dropped"]) > 0.5
    assert 0 < dropped.sum() < 8, dropped        # seed-fixed draw: both kinds present

    # The same noise, timesteps and model by hand; text and layout swapped for dropped films.
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_time, k_noise = jax.random.split(key)
    sigmas, timesteps, _ = objective.make_timestep_sampler(config)(k_time, 8)
    x0 = jnp.asarray(batch["latents"])
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    layout = batch["layout"]
    uncond = layout.without_text_windows()
    text = np.where(dropped[:, None, None], np.asarray(empty)[None], batch["text_states"])
    pick = lambda a, b: np.where(dropped.reshape((-1,) + (1,) * (np.ndim(a) - 1)), a, b)
    mixed = dataclasses.replace(layout, text_windows=pick(uncond.text_windows, layout.text_windows),
                           text_pad_start=pick(uncond.text_pad_start, layout.text_pad_start))
    pred = nnx.merge(graphdef, params, frozen, rest)(objective.noised(x0, noise, sigmas), timesteps,
                                                     jnp.asarray(text), mixed)
    want = objective.per_sample_loss(pred, x0, noise, objective.frame_mask(layout, 8, 5))
    np.testing.assert_allclose(np.asarray(aux["sample_loss"]), np.asarray(want), rtol=1e-5)

    # Kept films see their own caption: with dropout off, their losses are the same.
    config_off = tiny()
    _, aux_off = jax.jit(make_gradient_fn(config_off, graphdef, rest))(state, batch)
    np.testing.assert_allclose(np.asarray(aux_off["sample_loss"])[~dropped],
                               np.asarray(aux["sample_loss"])[~dropped], rtol=1e-6)
    match = np.abs(np.asarray(aux["sample_loss"]) - np.asarray(want)).max()
    gap = np.abs(np.asarray(aux_off["sample_loss"]) - np.asarray(aux["sample_loss"]))[dropped]
    assert gap.min() > 20 * match, (gap, match)   # the text swap is visible in the loss
    windowed = nnx.merge(graphdef, params, frozen, rest)(objective.noised(x0, noise, sigmas),
                                                         timesteps, jnp.asarray(text), layout)
    windowed = objective.per_sample_loss(windowed, x0, noise, objective.frame_mask(layout, 8, 5))
    gap = np.abs(np.asarray(windowed) - np.asarray(aux["sample_loss"]))[dropped]
    assert gap.min() > 20 * match, (gap, match)   # and so are the text windows kept by mistake


def test_caption_dropout_rate_and_bad_values():
    text = jnp.zeros((4000, 3, 2))
    _, _, dropped = objective.caption_dropout(jax.random.key(0), 0.1, text, None, jnp.ones((3, 2)))
    assert abs(float(jnp.mean(dropped)) - 0.1) < 0.015
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="caption_dropout"):
            objective.check_caption_dropout(bad)
    with pytest.raises(ValueError, match="empty-prompt states"):
        objective.caption_dropout(jax.random.key(0), 0.1, text, None, jnp.ones((4, 2)))


def events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


class Batches:
    def __init__(self, config):
        self.config, self.i = config, 0

    def __next__(self):
        self.i += 1
        return batch_of(self.config, 8, self.i)   # one film per test device


@pytest.mark.slow
def test_validation_films_reach_tensorboard(tmp_path):
    config = tiny("train.caption_dropout=0.5", "train.validate_every=2", "train.validation_films=1",
                  "train.validation_steps=2", "sample.guidance_scale=3.0")
    tokenizer, encoder = load_text_stack(config)
    summary = run_training(config, str(tmp_path), batches=Batches(config), steps=2,
                           tokenizer=tokenizer, text_encoder=encoder, vae=make_vae(config),
                           validation_score=lambda clips, films, truths: score_films(
                               config, clips, films, truths))
    assert summary["step"] == 2
    acc = events(str(tmp_path))
    tags = acc.Tags()
    assert {"val/film_00", "val/contact_sheet_00"} <= set(tags["images"]), tags["images"]
    film = acc.Images("val/film_00")
    assert [e.step for e in film] == [2]
    gif = Image.open(io.BytesIO(film[0].encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 17 and gif.size == (64, 64)
    sheet = acc.Images("val/contact_sheet_00")[0]
    assert Image.open(io.BytesIO(sheet.encoded_image_string)).format == "PNG"
    scalars = set(tags["scalars"])
    assert "val/seconds" in scalars and "train/caption_dropped" in scalars, scalars
    assert len([t for t in scalars if t.startswith("val/")]) > 2, scalars   # the world's metrics
    assert acc.Scalars("val/seconds")[0].step == 2


def test_validation_needs_the_sampling_stack_and_a_real_prompt_file(tmp_path):
    config = tiny("train.validate_every=1")
    with pytest.raises(ValueError, match="validate_every=1 samples films"):
        run_training(config, str(tmp_path / "a"), batches=Batches(config), steps=1)
    config = tiny("train.validate_every=1", f"train.validation_prompts={tmp_path}/none.jsonl")
    with pytest.raises(FileNotFoundError, match="none.jsonl"):
        run_training(config, str(tmp_path / "b"), batches=Batches(config), steps=1)
    config = tiny("train.caption_dropout=0.2")
    with pytest.raises(ValueError, match="caption_dropout=0.2 needs the text stack"):
        run_training(config, str(tmp_path / "c"), batches=Batches(config), steps=1)
    assert not glob.glob(str(tmp_path / "*" / "checkpoints" / "*"))
