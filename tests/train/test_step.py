"""The pure train step: gradient accumulation equals the big batch, EMA and AdamW follow their
formulas, a non-finite loss skips the update and is counted, loss falls on a fixed problem."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from holocine_jax.config import load_config
from holocine_jax.model import WanDiT
from holocine_jax.shots import ShotLayout
from holocine_jax.train.optim import learning_rate_schedule
from holocine_jax.train.state import init_train_state, split_model
from holocine_jax.train.step import make_train_step, prepare_batch

# 1 block, 17 frames at 64x64 -> latents [B, 5, 8, 8, 16], 80 tokens per film.
OVERRIDES = ["model.num_layers=1", "video.num_frames=17", "attention.impl=reference",
             "train.learning_rate=0.01", "train.warmup_steps=0", "train.ema_decay=0.9",
             "train.caption_dropout=0.0", "train.validate_every=0"]   # both: test_validation.py


def config(*more):
    return load_config("tiny", [f"--config.{o}" for o in OVERRIDES + list(more)])


@pytest.fixture(scope="module")
def model_parts():
    graphdef, params, _, rest = split_model(WanDiT.from_config(config(), rngs=nnx.Rngs(0)))
    return graphdef, params, rest


@pytest.fixture(scope="module")
def step_fn(model_parts):
    graphdef, _, rest = model_parts
    return jax.jit(make_train_step(config(), graphdef, rest))


def fixed_batch(b=4, seed=0):
    rng = np.random.default_rng(seed)
    layout = ShotLayout.stack([ShotLayout.from_latent_cuts(5, cuts, latent_hw=(4, 4), max_shots=4)
                               for cuts in ([2], [1, 3], [], [4])][:b])
    return dict(latents=jnp.asarray(2.0 * rng.standard_normal((b, 5, 8, 8, 16)), jnp.float32),
                text_states=jnp.asarray(rng.standard_normal((b, 64, 32)), jnp.float32), layout=layout)


def rel_err(a, b):
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (a, b))
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.slow  # 21 s: gradient accumulation vs the big batch; the sharded step test covers the step itself
def test_grad_accumulation_equals_the_big_batch_and_ema_follows_its_formula(model_parts, step_fn):
    graphdef, params, rest = model_parts
    state = init_train_state(config(), params)
    batch = fixed_batch()
    big, m_big = step_fn(state, batch)
    accumulated = jax.jit(make_train_step(config("train.grad_accum=2"), graphdef, rest))
    acc, m_acc = accumulated(state, batch)
    for key in ("loss", "grad_norm"):
        assert abs(float(m_acc[key]) - float(m_big[key])) <= 1e-5 * abs(float(m_big[key]))
    mu_big, mu_acc = big.opt_state[1][0].mu, acc.opt_state[1][0].mu   # (1 - b1) * clipped grads
    assert rel_err(mu_acc, mu_big) <= 1e-5
    assert rel_err(acc.params, big.params) <= 1e-5
    # EMA: 0.9 * old + 0.1 * new, elementwise
    expect = jax.tree.map(lambda old, new: 0.9 * old + 0.1 * new, params, big.params)
    assert rel_err(big.ema, expect) <= 1e-6
    # the first AdamW step by hand: p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)
    g = jax.tree.map(lambda m: m / 0.1, mu_big)
    by_hand = jax.tree.map(lambda p, g: p - 0.01 * (g / (np.abs(g) + 1e-8) + 0.01 * p), params, g)
    assert rel_err(big.params, by_hand) <= 1e-5
    with pytest.raises(ValueError, match="not divisible by config.train.grad_accum=3"):
        make_train_step(config("train.grad_accum=3"), graphdef, rest)(state, batch)


def test_non_finite_loss_skips_the_update_and_counts_it(model_parts, step_fn):
    state = init_train_state(config(), model_parts[1])
    before = jax.device_get(state)
    bad = fixed_batch()
    bad["latents"] = bad["latents"].at[1, 0, 0, 0, 0].set(jnp.inf)
    state, metrics = step_fn(state, bad)
    assert not np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 1.0
    assert (int(state.step), int(state.skipped)) == (1, 1)
    for name in ("params", "opt_state", "ema"):
        for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(state, name))):
            assert np.array_equal(a, b), name
    state, metrics = step_fn(state, fixed_batch())
    assert np.isfinite(float(metrics["loss"])) and (int(state.step), int(state.skipped)) == (2, 1)
    assert rel_err(state.params, before.params) > 1e-4


def test_loss_falls_on_a_fixed_problem(model_parts, step_fn):
    state = init_train_state(config(), model_parts[1])
    batch = fixed_batch()   # films of one per-channel colour (scale 2) with small variations
    rng = np.random.default_rng(1)
    batch["latents"] = jnp.asarray(2 * rng.standard_normal(16) + 0.3 * rng.standard_normal((4, 5, 8, 8, 16)),
                                   jnp.float32)
    losses = []
    for _ in range(60):
        state, metrics = step_fn(state, batch)
        losses.append(float(np.mean(metrics["sample_loss"])))
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.4 * first, (first, last)


def test_learning_rate_schedules_by_formula():
    c = config("train.warmup_steps=10", "train.steps=110", "train.schedule=cosine",
               "train.min_lr_ratio=0.1").train
    lr = learning_rate_schedule(c)
    for step in (0, 5, 10, 60, 110):
        if step < 10:
            expect = 0.01 * step / 10
        else:
            expect = 0.01 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (step - 10) / 100)))
        assert abs(float(lr(step)) - expect) < 1e-7
    assert float(learning_rate_schedule(config().train)(1234)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="config.train.schedule='linear'"):
        learning_rate_schedule(config("train.schedule=linear").train)


def test_prepare_batch_encodes_video_and_text_and_names_missing_keys():
    c = config()

    class Halve:   # any object with `encode` (the contract): [B, T, H, W, 3] -> [B, F, h, w, z]
        def encode(self, video):
            return jnp.zeros((video.shape[0], 5, 8, 8, 16)) + video.mean()

    video = np.full((2, 17, 64, 64, 3), 0.5, np.float32)
    ids, mask = np.ones((2, 64), np.int32), np.ones((2, 64), np.int32)
    out = prepare_batch(dict(video=video, input_ids=ids, attention_mask=mask), c, vae=Halve(),
                        text_encoder=lambda i, m: jnp.ones((2, 64, 32)) * i[..., None])
    mean, std = np.asarray(c.vae.latents_mean), np.asarray(c.vae.latents_std)
    np.testing.assert_allclose(out["latents"][0, 0, 0, 0], (0.5 - mean) / std, rtol=1e-6)
    assert out["text_states"].shape == (2, 64, 32) and out["layout"] is None
    with pytest.raises(KeyError, match="'latents' or 'video'"):
        prepare_batch(dict(text_states=np.zeros((1, 2, 3))), c)
    with pytest.raises(ValueError, match="no vae"):
        prepare_batch(dict(video=video, text_states=np.zeros((2, 64, 32))), c)
    with pytest.raises(KeyError, match="without 'attention_mask'"):
        prepare_batch(dict(latents=np.zeros((2, 5, 8, 8, 16)), input_ids=ids), c, text_encoder=print)


class CountingTextEncoder(nnx.Module):
    """The tiny seeded UMT5 (an NNX module) counting how often its Python code runs."""
    calls = 0

    def __init__(self, c):
        from holocine_jax.text import tiny_text_encoder
        self.inner = tiny_text_encoder(c)

    def __call__(self, ids, mask):
        type(self).calls += 1
        return self.inner(ids, mask)


class CountingDCT:
    """The DCT autoencoder (a plain object: a constant of the program), counting encode runs."""

    def __init__(self, c):
        from holocine_jax.vae import make_vae
        self.inner, self.calls = make_vae(c), 0

    def encode(self, video):
        self.calls += 1
        return self.inner.encode(video)


def raw_batches(n, b=2, seed=0):
    """Pipeline-style batches: video [b, 17, 64, 64, 3] in [-1, 1], token ids + mask [b, 128]."""
    rng = np.random.default_rng(seed)
    layout = ShotLayout.stack([ShotLayout.from_latent_cuts(5, [2], latent_hw=(4, 4), max_shots=4)] * b)
    for _ in range(n):
        mask = (np.arange(128) < rng.integers(20, 128, size=(b, 1))).astype(np.int32)
        yield dict(video=rng.uniform(-1, 1, (b, 17, 64, 64, 3)).astype(np.float32),
                   input_ids=(rng.integers(1, 50, (b, 128)) * mask).astype(np.int32),
                   attention_mask=mask, layout=layout, index=np.arange(b, dtype=np.int64))


def test_batch_encoder_is_one_compiled_program_equal_to_the_eager_path():
    from holocine_jax.train.step import make_batch_encoder

    c = config()
    text, vae = CountingTextEncoder(c), CountingDCT(c)
    encode = make_batch_encoder(c, vae=vae, text_encoder=text)
    CountingTextEncoder.calls = 0
    for raw in raw_batches(3):
        out = encode(raw)
        assert out["layout"] is raw["layout"] and "index" not in out
        eager = prepare_batch(raw, c, vae=vae.inner, text_encoder=text.inner)
        for key in ("latents", "text_states"):
            np.testing.assert_allclose(out[key], eager[key], rtol=1e-5, atol=1e-5)
    assert out["latents"].shape == (2, 5, 8, 8, 16) and out["text_states"].shape == (2, 128, 32)
    # Traced once for three batches: the encoders' Python ran once, not per step (eager: 3 each).
    assert CountingTextEncoder.calls == 1 and vae.calls == 1


def test_batch_encoder_takes_the_pipelines_uint8_pixels_as_x_over_127_5_minus_1():
    from holocine_jax.train.step import make_batch_encoder
    from holocine_jax.vae import make_vae

    c = config()
    vae = make_vae(c)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 17, 64, 64, 3), dtype=np.uint8)
    text = np.zeros((2, 64, 32), np.float32)
    got = make_batch_encoder(c, vae=vae)(dict(video=pixels, text_states=text))["latents"]
    floats = pixels.astype(np.float32) / 127.5 - 1.0  # what the pipeline shipped before
    want = prepare_batch(dict(video=floats, text_states=text), c, vae=vae)["latents"]
    assert got.shape == (2, 5, 8, 8, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_progress_line_and_durations():
    from holocine_jax.train.metrics import format_duration, progress_line

    assert [format_duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]
    scalars = {"train/loss": 0.41234, "perf/steps_per_sec": 2.0, "train/skipped_steps": 0.0}
    assert progress_line(20, scalars, 300) == "train: step 20/300, loss 0.4123, 2.00 steps/s, ETA 2m20s"
    assert progress_line(20, dict(scalars, **{"train/skipped_steps": 3.0})) == \
        "train: step 20, loss 0.4123, 2.00 steps/s, 3 skipped"


@pytest.mark.slow
def test_training_on_raw_batches_prints_progress_and_compiles_encoding(tmp_path, capsys):
    from holocine_jax.train.loop import run_training

    c = config("train.log_every=2", "train.checkpoint_every=100", "train.batch_size=8")
    text, vae = CountingTextEncoder(c), CountingDCT(c)
    CountingTextEncoder.calls = 0
    summary = run_training(c, str(tmp_path), batches=raw_batches(4, b=8), vae=vae, text_encoder=text,
                           steps=4)
    assert summary["step"] == 4 and np.isfinite(summary["loss"])
    assert CountingTextEncoder.calls == 1 and vae.calls == 1   # compiled, not op by op per step
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("train:")]
    assert lines[0].startswith("train: steps 0 -> 4 in ")
    for line, step in zip(lines[1:], (2, 4)):
        assert line.startswith(f"train: step {step}/4, loss ") and " steps/s, ETA " in line, line
    assert len(lines) == 3, lines
