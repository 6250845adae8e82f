"""Restore on another mesh (issue 21): a training checkpoint written on fsdp 8 restores into
fsdp 4 x context 2, tensor 2 x fsdp 4 and one device — params, optimizer state, EMA, step, rng and
the data position exactly — and training continues there with the next loss of the uninterrupted
fsdp-8 run (1e-6 relative; measured ~1e-7). A checkpoint of another model config is refused by
name. This is what moving a run from v5p-64 to v5p-128, or to a 1-host eval, does."""
import shutil

import jax
import numpy as np
import pytest

from holocine_jax.config import load_config
from holocine_jax.parallel import make_mesh
from holocine_jax.shots import ShotLayout
from holocine_jax.train.checkpointing import TrainCheckpointer
from holocine_jax.train.loop import abstract_train_state, run_training
from holocine_jax.train.metrics import read_metrics
from holocine_jax.train.step import make_batch_encoder, make_train_step

B, SAVED, NEXT = 8, 2, 3
LOSS_RTOL = 1e-6
TARGETS = {"fsdp4-context2": dict(fsdp=4, context=2), "tensor2-fsdp4": dict(fsdp=4, tensor=2)}


def config(**mesh):
    c = load_config("tiny", [f"--config.{o}" for o in (
        "model.num_layers=1", "model.ffn_dim=128", "attention.impl=xla", "train.learning_rate=0.01",
        "train.warmup_steps=1", "train.ema_decay=0.9", "train.log_every=1",
        f"train.checkpoint_every={SAVED}", "train.keep_checkpoints=3", "train.caption_dropout=0.0",
        "train.validate_every=0")])
    c.mesh.update(dict(dict(data=1, fsdp=8, context=1, tensor=1), **mesh))
    return c


class Batches:
    """Batch i of 8 films depends on i alone; the iterator state is the position."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        rng = np.random.default_rng(self.position)
        layouts = [ShotLayout.from_latent_cuts(5, sorted(rng.choice(np.arange(1, 5), size=k, replace=False).tolist()),
                                               latent_hw=(4, 4), max_shots=4) for k in (1, 2, 3, 0) * 2]
        self.position += 1
        return dict(latents=rng.standard_normal((B, 5, 8, 8, 16)).astype(np.float32),
                    text_states=rng.standard_normal((B, 128, 32)).astype(np.float32),
                    layout=ShotLayout.stack(layouts))

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


def losses(workdir) -> dict[int, float]:
    return {s: m["train/loss"] for s, m in read_metrics(f"{workdir}/metrics.jsonl").items()}


def gathered(state) -> list[np.ndarray]:
    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(state)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """fsdp 8: steps 1..NEXT straight, checkpoints at SAVED and NEXT."""
    root = tmp_path_factory.mktemp("cross_mesh")
    run_training(config(), str(root / "fsdp8"), batches=Batches(), steps=NEXT)
    with TrainCheckpointer(str(root / "fsdp8" / "checkpoints"), config()) as ckpt:
        saved = ckpt.restore(abstract_train_state(config(), make_mesh(config().mesh))[2], SAVED)
    return root, saved, losses(root / "fsdp8")


def resumable_copy(root, name):
    """The fsdp-8 workdir as it was at step SAVED (its later step removed)."""
    dst = root / name
    shutil.copytree(root / "fsdp8" / "checkpoints", dst / "checkpoints")
    shutil.rmtree(dst / "checkpoints" / str(NEXT))
    return dst


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "fsdp4-context2" else pytest.mark.slow)
                                  for n in TARGETS])   # default run: one reshard (test budget)
def test_restore_on_another_mesh_is_exact_and_training_continues(source, name):
    root, (saved, saved_data), reference = source
    c = config(**TARGETS[name])
    mesh = make_mesh(c.mesh)
    workdir = resumable_copy(root, name)
    with TrainCheckpointer(str(workdir / "checkpoints"), c) as ckpt:
        state, data = ckpt.restore(abstract_train_state(c, mesh)[2])
    assert data == saved_data == {"position": SAVED} and int(state.step) == SAVED
    kernel = state.params["blocks"]["attn1"]["to_q"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape and kernel.sharding.spec != ()  # laid out anew
    for x, y in zip(gathered(state), gathered(saved), strict=True):   # params, opt, EMA, rng, step
        assert np.array_equal(x, y)
    run_training(c, str(workdir), batches=Batches(), steps=NEXT)       # the real resume path
    got = losses(workdir)
    assert sorted(got) == [NEXT]
    assert abs(got[NEXT] - reference[NEXT]) <= LOSS_RTOL * abs(reference[NEXT]), (got, reference)


def test_restore_on_one_device_is_exact_and_gives_the_next_loss(source):
    root, (saved, saved_data), reference = source
    c = config()
    c.mesh.fsdp = 1
    mesh = make_mesh(c.mesh, jax.devices()[:1])    # e.g. a 1-host eval of a pod's checkpoint
    graphdef, rest, abstract, sharding = abstract_train_state(c, mesh)
    with TrainCheckpointer(str(root / "fsdp8" / "checkpoints"), c) as ckpt:
        state, data = ckpt.restore(abstract, SAVED)
    assert data == saved_data and {d for x in jax.tree.leaves(state) for d in x.devices()} == {jax.devices()[0]}
    for x, y in zip(gathered(state), gathered(saved), strict=True):
        assert np.array_equal(x, y)
    batches = Batches()
    batches.set_state(data)
    batch = make_batch_encoder(c)(next(batches))
    with jax.set_mesh(mesh):
        _, metrics = jax.jit(make_train_step(c, graphdef, rest))(state, batch)
    loss = float(metrics["loss"])
    assert abs(loss - reference[NEXT]) <= LOSS_RTOL * abs(reference[NEXT]), (loss, reference)


def test_a_checkpoint_of_another_model_config_is_refused_by_name(source):
    root = source[0]
    c = config(fsdp=4, context=2)
    c.model.num_heads = 8
    with pytest.raises(ValueError, match=r"another config \(config.model.num_heads: 4 stored, 8 now\)"):
        TrainCheckpointer(str(root / "fsdp8" / "checkpoints"), c)
