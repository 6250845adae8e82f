"""Export -> PyTorch, import(export(x)) bit-identical, official layout, A14B experts, bad input."""
import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import tiny_config
from holocine_jax.convert import (CheckpointMismatchError, load_diffusers, load_official,
                                  save_diffusers, save_official)
from holocine_jax.convert import wan
from holocine_jax.model import WanDiT
from model.test_parity import assert_close, inputs, torch_forward


def random_model(config, seed=0):
    """WanDiT with every parameter random (the default init zeroes proj_out)."""
    model = WanDiT.from_config(config, rngs=nnx.Rngs(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        var.set_value(0.3 * jax.random.normal(next(keys), value.shape, value.dtype))
    return model


def forward(model, latents, timesteps, text):
    return np.asarray(nnx.jit(lambda m, x, t, s: m(x, t, s))(model, latents, timesteps, text))


def assert_matches_torch(model, ref_model, config, fhw):
    """Our model and a PyTorch WanTransformer3DModel give the same output on random inputs."""
    latents, timesteps, text = inputs(config, fhw)
    with torch.no_grad():
        ref = torch_forward(ref_model, latents, timesteps, text).numpy()
    assert_close(forward(model, latents, timesteps, text), ref)


def assert_same_params(a, b):
    fa, fb = dict(nnx.to_flat_state(nnx.state(a, nnx.Param))), dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
    assert fa.keys() == fb.keys()
    for path in fa:
        x, y = np.asarray(fa[path].get_value()), np.asarray(fb[path].get_value())
        assert x.dtype == y.dtype and np.array_equal(x, y), path


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model(config):
    return random_model(config)


def test_export_loads_in_diffusers_and_matches(model, config, tmp_path):
    out = save_diffusers(model, str(tmp_path / "exported"))
    ref_model = WanTransformer3DModel.from_pretrained(out).eval()
    assert_matches_torch(model, ref_model, config, (3, 4, 6))
    assert_same_params(load_diffusers(out, config), model)


def test_sharded_export_round_trips(model, config, tmp_path):
    out = save_diffusers(model, str(tmp_path / "sharded"), max_shard_bytes=64 * 1024)
    files = sorted(os.listdir(out))
    index = json.load(open(os.path.join(out, "diffusion_pytorch_model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(f in files for f in shards)
    assert_same_params(load_diffusers(out, config), model)
    ref_model = WanTransformer3DModel.from_pretrained(out).eval()
    assert_matches_torch(model, ref_model, config, (1, 4, 4))


def test_official_layout_round_trips_and_matches_diffusers_converter(model, config, tmp_path):
    out = save_official(model, str(tmp_path / "official"))
    tensors = load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    assert "blocks.0.self_attn.q.weight" in tensors and "head.modulation" in tensors
    assert json.load(open(os.path.join(out, "config.json")))["_class_name"] == "WanModel"
    assert_same_params(load_official(out, config), model)
    # diffusers' own official->diffusers converter is the independent reference for the names.
    converted = convert_wan_transformer_to_diffusers({k: torch.from_numpy(v) for k, v in tensors.items()})
    ref_model = WanTransformer3DModel(**{k: v for k, v in wan.diffusers_config(config.model).items()
                                         if not k.startswith("_")}).eval()
    ref_model.load_state_dict(converted, strict=True)
    assert_matches_torch(model, ref_model, config, (3, 4, 4))


def test_official_prefixed_single_file(model, config, tmp_path):
    out = save_official(model, str(tmp_path / "official"))
    tensors = load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    save_file({"model.diffusion_model." + k: v for k, v in tensors.items()}, str(prefixed / "dit.safetensors"))
    (prefixed / "config.json").write_text(open(os.path.join(out, "config.json")).read())
    assert_same_params(load_official(str(prefixed / "dit.safetensors"), config), model)


def test_a14b_experts_use_their_subfolders(config, tmp_path):
    high, low = random_model(config, seed=0), random_model(config, seed=7)
    for save, load, folders in ((save_diffusers, load_diffusers, ("transformer", "transformer_2")),
                                (save_official, load_official, ("high_noise_model", "low_noise_model"))):
        root = tmp_path / folders[0]
        save(high, str(root), expert="high")
        save(low, str(root), expert="low")
        assert sorted(os.listdir(root)) == sorted(folders)
        assert_same_params(load(str(root), config, expert="high"), high)
        assert_same_params(load(str(root), config, expert="low"), low)
        # An expert's own folder loads as that expert; a root holding both needs an expert, and
        # the other expert's folder is refused.
        assert_same_params(load(str(root / folders[1]), config, expert="low"), low)
        with pytest.raises(ValueError, match="holds both A14B experts"):
            load(str(root), config)
        with pytest.raises(ValueError, match=f"{folders[0]} is the high-noise expert's folder, "
                                             "not the low-noise one"):
            load(str(root / folders[0]), config, expert="low")


def test_bfloat16_export(model, config, tmp_path):
    out = save_diffusers(model, str(tmp_path / "bf16"), dtype="bfloat16")
    tensors = load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    assert {str(v.dtype) for v in tensors.values()} == {"bfloat16"}
    ref_model = WanTransformer3DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    weight = ref_model.blocks[0].attn1.to_q.weight.detach().float().numpy()
    ours = np.asarray(model.blocks.attn1.to_q.kernel[...][0]).T
    np.testing.assert_array_equal(weight, ours.astype(tensors["proj_out.weight"].dtype).astype(np.float32))


def _corrupt(src, dst, edit):
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(open(os.path.join(src, "config.json")).read())


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.pop("blocks.1.attn2.to_k.weight"),
     ["missing tensors (1)", "blocks.1.attn2.to_k.weight (expected shape [64, 64])"]),
    (lambda t: t.update({"blocks.0.attn1.add_k_proj.weight": np.zeros((64, 64), np.float32)}),
     ["unexpected tensors (1)", "blocks.0.attn1.add_k_proj.weight (shape [64, 64])"]),
    (lambda t: t.update({"proj_out.weight": np.zeros((64, 32), np.float32)}),
     ["mis-shaped tensors (1)", "proj_out.weight: got [64, 32], expected [64, 64]"]),
])
def test_bad_checkpoint_names_the_tensor(model, config, tmp_path, edit, expected):
    good = save_diffusers(model, str(tmp_path / "good"))
    bad = str(tmp_path / "bad")
    _corrupt(good, bad, edit)
    with pytest.raises(CheckpointMismatchError) as info:
        load_diffusers(bad, config)
    for text in expected:
        assert text in str(info.value)


def test_failed_export_leaves_nothing(model, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(wan, "write_sharded", fail)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers(model, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_export_refuses_non_empty_directory(model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        save_diffusers(model, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
