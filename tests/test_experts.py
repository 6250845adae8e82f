"""A14B expert identity end to end: import the low expert from an official two-expert folder ->
its config.json says low -> a train step from it draws low-noise timesteps only -> export writes
low_noise_model/ and transformer_2/ with the source's tensors. Wrong experts (a flag on a
single-model config, a missing --expert, a disagreeing --expert or init_from, a pair in the wrong
order, an incomplete run directory) are refused with both names, writing nothing."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.numpy import load_file

from conftest import tiny_config
from convert.test_roundtrip import random_model
from holocine_jax.checkpoint import checkpoint_dirs, load_config_json
from holocine_jax.cli import main
from holocine_jax.convert import save_official
from holocine_jax.prompts import build_prompt
from holocine_jax.sample.run import FilmRequest, run_sample
from holocine_jax.train.checkpointing import TrainCheckpointer
from holocine_jax.train.loop import initial_model, run_training
from holocine_jax.train.state import init_train_state, split_model
from holocine_jax.train.step import make_train_step

WEIGHTS = "diffusion_pytorch_model.safetensors"
# wan22_t2v_a14b in float32; the DiT's size (the unit tests' tiny one) comes from the weights.
A14B = ["--config", "wan22_t2v_a14b", "--config.model.dtype=float32",
        "--config.model.param_dtype=float32", "--config.model.remat=none"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An official-layout A14B folder: high_noise_model/ (seed 0) and low_noise_model/ (seed 7)."""
    root = str(tmp_path_factory.mktemp("release") / "Wan2.2-T2V-A14B")
    for expert, seed in (("high", 0), ("low", 7)):
        save_official(random_model(tiny_config(), seed=seed), root, expert=expert)
    return root


def import_expert(release, out, expert):
    main(["import", *A14B, "--format", "official", "--src", release, "--out", out,
          "--expert", expert])
    return out


def test_low_expert_import_train_export(release, tmp_path, capsys):
    ckpt = import_expert(release, str(tmp_path / "low"), "low")
    assert "the low expert's weights" in capsys.readouterr().out
    config = load_config_json(ckpt)
    assert config.expert == "low"
    # A train step started from it (init_from) trains the low-noise range: t < boundary * 1000.
    config.train.init_from = ckpt
    graphdef, params, _, rest = split_model(initial_model(config))
    rng = np.random.default_rng(0)
    batch = dict(latents=jnp.asarray(rng.standard_normal((32, 2, 4, 4, 16)), jnp.float32),
                 text_states=jnp.asarray(rng.standard_normal((32, 8, 32)), jnp.float32))
    _, metrics = jax.jit(make_train_step(config, graphdef, rest))(init_train_state(config, params), batch)
    t = np.asarray(metrics["timesteps"])
    assert np.isfinite(float(metrics["loss"]))
    assert t.min() >= 0 and t.max() < config.experts.boundary * 1000 and t.max() > 500, t
    # Export puts it where the low-noise expert goes, with the source's tensors (the high expert,
    # seed 0, differs from them).
    main(["export", "--checkpoint", ckpt, "--format", "official", "--out", str(tmp_path / "off")])
    assert os.listdir(tmp_path / "off") == ["low_noise_model"]
    src = load_file(os.path.join(release, "low_noise_model", WEIGHTS))
    got = load_file(str(tmp_path / "off" / "low_noise_model" / WEIGHTS))
    assert got.keys() == src.keys() and all(np.array_equal(got[k], src[k]) for k in src)
    high = load_file(os.path.join(release, "high_noise_model", WEIGHTS))
    assert not np.array_equal(high["head.head.weight"], src["head.head.weight"])
    main(["export", "--checkpoint", ckpt, "--format", "diffusers", "--out", str(tmp_path / "dif")])
    assert os.listdir(tmp_path / "dif") == ["transformer_2"]
    # diffusers' own official -> diffusers converter is the independent reference for the names.
    ref = convert_wan_transformer_to_diffusers({k: torch.from_numpy(v) for k, v in src.items()})
    got = load_file(str(tmp_path / "dif" / "transformer_2" / WEIGHTS))
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k].numpy()) for k in ref)


def test_wrong_experts_are_refused_and_write_nothing(release, tmp_path):
    out = str(tmp_path / "out")
    tiny = ["--config", "tiny", "--config.model.dtype=float32"]
    with pytest.raises(ValueError, match=r"--expert low: config 'tiny' is a single model"):
        main(["import", *tiny, "--format", "official", "--src", release, "--out", out,
              "--expert", "low"])
    with pytest.raises(ValueError, match=r"experts \('high', 'low'\): say which one with --expert high\|low"):
        main(["import", *A14B, "--format", "official", "--src", release, "--out", out])
    ckpt = import_expert(release, str(tmp_path / "low"), "low")
    with pytest.raises(ValueError, match=rf"--expert high disagrees with {re.escape(repr(ckpt))}, "
                                         r"which holds the 'low' expert"):
        main(["export", "--checkpoint", ckpt, "--format", "diffusers", "--out", out, "--expert", "high"])
    with pytest.raises(ValueError, match=r"--config.expert=high disagrees with .* the 'low' expert"):
        main(["export", "--checkpoint", ckpt, "--format", "official", "--out", out, "--config.expert=high"])
    assert not os.path.exists(out)
    config = load_config_json(ckpt)
    config.expert, config.train.init_from = "high", ckpt
    message = rf"init_from={re.escape(repr(ckpt))} holds the 'low' expert but config.expert='high'"
    with pytest.raises(ValueError, match=message):
        initial_model(config)
    # Through a training run: refused before the workdir records a config that would refuse the
    # corrected rerun (TrainCheckpointer writes config.json with its first save).
    work = str(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        run_training(config, work, batches=iter([]))
    assert not os.path.exists(os.path.join(work, "checkpoints", "config.json"))
    config.expert = "low"
    TrainCheckpointer(os.path.join(work, "checkpoints"), config).close()


def test_expert_pair_order_and_run_directories(release, tmp_path):
    high = import_expert(release, str(tmp_path / "run" / "high"), "high")
    low = import_expert(release, str(tmp_path / "run" / "low"), "low")
    assert checkpoint_dirs(str(tmp_path / "run")) == [high, low]
    assert checkpoint_dirs([high, low]) == [high, low]
    film = build_prompt("A circle in a room.", ["Wide shot: the circle.", "Close-up: the circle."])
    out = str(tmp_path / "film")
    with pytest.raises(ValueError, match=rf"go in the order high, low: {re.escape(repr(low))} holds "
                                         rf"the 'low' expert; {re.escape(repr(high))} holds the 'high'"):
        run_sample(load_config_json(high), [low, high], [FilmRequest(film)], out)
    assert not os.path.exists(out)
    # A run directory must hold exactly one checkpoint per expert.
    os.makedirs(tmp_path / "half" / "a")
    (tmp_path / "half" / "a" / "config.json").write_text(json.dumps(load_config_json(high).to_dict()))
    with pytest.raises(ValueError, match=r"must hold one checkpoint per expert \('high', 'low'\); "
                                         r"found expert 'high': .*half/a$"):
        checkpoint_dirs(str(tmp_path / "half"))
    os.makedirs(tmp_path / "half" / "b" / "checkpoints")
    (tmp_path / "half" / "b" / "checkpoints" / "config.json").write_text(
        json.dumps(load_config_json(high).to_dict()))
    with pytest.raises(ValueError, match=r"found expert 'high': .*half/a, .*half/b/checkpoints$"):
        checkpoint_dirs(str(tmp_path / "half"))
