"""ViT / DINOv2 in NNX vs transformers' ViTModel / Dinov2Model (tiny random models saved to tmp
dirs, one sharded with an index): the final-LN class token at the config's grid and at other grids
(position interpolation), VBench's DINO preprocessing, 8-device sharding and the loader errors."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import transformers

from holocine_jax.eval.towers import embed_sharded
from holocine_jax.eval.vit import IMAGENET_MEAN, IMAGENET_STD, imagenet_pixels, load_vit
from holocine_jax.parallel import make_mesh

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """{"vit", "dinov2" (saved in shards + index), "swiglu"}: (dir, torch model), every parameter
    offset at random (layer scales and LayerNorms are no identities)."""
    configs = {"vit": transformers.ViTConfig(intermediate_size=37, **SMALL),
               "dinov2": transformers.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **SMALL),
               "swiglu": transformers.Dinov2Config(use_swiglu_ffn=True, **SMALL)}
    out = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(i)
        model = (transformers.ViTModel if name == "vit" else transformers.Dinov2Model)(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path, max_shard_size="40KB" if name == "dinov2" else "1GB")
        out[name] = (path, model)
    assert os.path.exists(os.path.join(out["dinov2"][0], "model.safetensors.index.json"))
    return out


@pytest.mark.parametrize("name, size", [("vit", (32, 32)), ("vit", (40, 56)), ("dinov2", (40, 48)),
                                        ("swiglu", (48, 32))])
def test_features_match_transformers(towers, name, size):
    path, ref = towers[name]
    pixels = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(pixel_values=pixels, **({"interpolate_pos_encoding": True} if name == "vit" else {}))
    got = embed_sharded(load_vit(path).features, pixels.permute(0, 2, 3, 1).numpy())
    print(f"{name} {size}: rel {rel(got, out.last_hidden_state[:, 0]):.2e}")
    assert got.shape == (3, 32) and rel(got, out.last_hidden_state[:, 0]) < 1e-5
    if name == "vit":   # the CLS token after the final LayerNorm, not the tanh pooler
        assert rel(got, out.pooler_output) > 1e-2


def test_pixels_follow_vbench_dino_transform():
    frames = np.random.default_rng(2).integers(0, 256, (2, 30, 20, 3), dtype=np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()        # VBench: Resize(16) (bilinear)
    x = torch.nn.functional.interpolate(x, size=(24, 16), mode="bilinear", antialias=True) / 255.0
    ref = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    got = imagenet_pixels(frames, 16)                                # no centre crop
    np.testing.assert_allclose(np.asarray(got), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_sharded_equals_one_device(towers):
    vit = load_vit(towers["dinov2"][0])
    pixels = np.random.default_rng(3).normal(size=(5, 32, 40, 3)).astype(np.float32)
    mesh = make_mesh(dict(data=1, fsdp=-1, context=1, tensor=1))
    np.testing.assert_allclose(embed_sharded(vit.features, pixels, mesh=mesh),
                               embed_sharded(vit.features, pixels, batch_size=2), rtol=1e-6, atol=1e-6)


def test_errors(tmp_path, towers):
    with pytest.raises(FileNotFoundError, match="/nonexistent/dino"):
        load_vit("/nonexistent/dino")
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(clip))}.*'clip'.*expected 'vit' or 'dinov2'"):
        load_vit(str(clip))
    sharded = shutil.copytree(towers["dinov2"][0], tmp_path / "sharded")
    os.remove(sorted(sharded.glob("model-*.safetensors"))[-1])
    with pytest.raises(FileNotFoundError, match=re.escape(str(sharded))):
        load_vit(str(sharded))
    plain = shutil.copytree(towers["swiglu"][0], tmp_path / "plain")   # SwiGLU weights, MLP config
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "use_swiglu_ffn": False}))
    with pytest.raises(ValueError, match=r"missing.*mlp\.fc1\.weight.*unexpected.*mlp\.weights_in\.weight"):
        load_vit(str(plain))
