"""CLIP in NNX vs transformers' CLIPModel (tiny random models saved to tmp dirs), the tokenizer vs
the directory's CLIPTokenizer, preprocessing vs torch's antialiased resize, the aesthetic heads
vs torch modules, 8-device sharding and the loader errors."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as torch_save_file

from holocine_jax.eval.clip import (CLIP_MEAN, CLIP_STD, ClipTokenizer, clip_pixels,
                                    load_aesthetic_head, load_clip)
from holocine_jax.eval.towers import embed_sharded
from holocine_jax.parallel import make_mesh

TEXTS = ["A red circle", "a big red circle", "a red circle is a very big red circle", "", "Red!!"]
SMALL = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
REFERENCES = {}   # name -> the torch CLIPModel the `dirs` fixture saved (no reload needed)


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def jitter(model):
    """Random offsets on every parameter (LayerNorms and layer scales too, so none is a no-op)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def clip_tokenizer():
    """A real CLIPTokenizer (byte-level BPE) over a tiny vocabulary; `big</w>` comes after the
    special tokens, so its id exceeds EOS's as added tokens do (transformers PR #24773)."""
    letters = list("abcdefghijklmnopqrstuvwxyz!")
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"),
              ("circl", "e</w>"), ("b", "i"), ("bi", "g</w>")]
    words = letters + [c + "</w>" for c in letters] + [a + b for a, b in merges[:-1]]
    words += ["<|startoftext|>", "<|endoftext|>", "big</w>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=8), vocab


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"legacy": eos_token_id 2, quick_gelu; "eos": the real EOS id, gelu} CLIPModel dirs with the
    tokenizer and a CLIPImageProcessor (32 px)."""
    tokenizer, vocab = clip_tokenizer()
    out = {}
    for name, eos, act in (("legacy", 2, "quick_gelu"), ("eos", vocab["<|endoftext|>"], "gelu")):
        path = str(tmp_path_factory.mktemp(name))
        config = transformers.CLIPConfig(
            text_config=dict(vocab_size=len(vocab), max_position_embeddings=8, hidden_act=act,
                             bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos,
                             pad_token_id=vocab["<|endoftext|>"], **SMALL),
            vision_config=dict(image_size=32, patch_size=8, hidden_act=act, **SMALL), projection_dim=16)
        torch.manual_seed(len(out))
        model = jitter(transformers.CLIPModel(config))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                        crop_size={"height": 32, "width": 32}).save_pretrained(path)
        out[name] = path
        REFERENCES[name] = model
    return out


@pytest.fixture(scope="module")
def models(dirs):
    """{name: (our ClipModel, the transformers CLIPModel)}."""
    return {name: (load_clip(path), REFERENCES[name]) for name, path in dirs.items()}


def test_tokenizer_matches_transformers(dirs):
    ids = ClipTokenizer(dirs["eos"])(TEXTS)
    ref = transformers.AutoTokenizer.from_pretrained(dirs["eos"])(TEXTS, padding="max_length",
                                                                  truncation=True)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    eos = ids[3, 1]                                   # "" -> [BOS, EOS, pads]
    assert ids.shape == (len(TEXTS), 8) and ids[2, -1] == eos and (ids[2] == eos).sum() == 1  # truncated


@pytest.mark.parametrize("name", ["legacy", "eos"])
def test_features_match_transformers(dirs, models, name):
    ours, ref = models[name]
    tokens = transformers.AutoTokenizer.from_pretrained(dirs[name])(
        TEXTS, padding="max_length", truncation=True, return_tensors="pt")
    ids = ClipTokenizer(dirs[name])(TEXTS)
    eos = ids[3, 1]                                   # "" -> [BOS, EOS, pads]
    # "a big red circle": the largest id (`big`) is not the first EOS, so the two paths differ
    assert (ids.argmax(-1) != (ids == eos).argmax(-1)).any()
    with torch.no_grad():
        text = ref.get_text_features(**tokens).pooler_output.numpy()
    got_text = embed_sharded(ours.text_features, ids)
    print(f"clip {name} text: rel {rel(got_text, text):.2e}")
    assert got_text.shape == (len(TEXTS), 16) and rel(got_text, text) < 1e-5
    if name == "legacy":   # (the vision tower's code does not depend on the text config)
        pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            image = ref.get_image_features(pixel_values=pixels).pooler_output.numpy()
        got_image = embed_sharded(ours.image_features, pixels.permute(0, 2, 3, 1).numpy())
        print(f"clip {name} image: rel {rel(got_image, image):.2e}")
        assert got_image.shape == (3, 16) and rel(got_image, image) < 1e-5


def test_pixels_follow_vbench_clip_transform(dirs, models):
    frames = np.random.default_rng(2).integers(0, 256, (2, 30, 45, 3), dtype=np.uint8)
    ours, _ = models["eos"]
    assert (ours.transform.size, ours.transform.crop) == (32, 32)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()        # VBench: Resize(bicubic) on a
    x = torch.nn.functional.interpolate(x, size=(32, 48), mode="bicubic", antialias=True)  # tensor
    x = x[:, :, :, 8:40] / 255.0                                     # CenterCrop(32), /255
    ref = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    np.testing.assert_allclose(np.asarray(ours.pixels(frames)), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    assert clip_pixels(frames, 24, crop=20).shape == (2, 20, 20, 3)


def test_sharded_equals_one_device(models, dirs):
    """Text here (the image tower's sharding is tested in test_vit.py: the same ShardedEmbedder)."""
    ours, _ = models["legacy"]
    mesh = make_mesh(dict(data=2, fsdp=4, context=1, tensor=1))
    ids = ClipTokenizer(dirs["legacy"])(TEXTS)
    one = embed_sharded(ours.text_features, ids, batch_size=2)      # 3 chunks, the last padded
    eight = embed_sharded(ours.text_features, ids, mesh=mesh)       # 5 rows padded to 8 shards
    np.testing.assert_allclose(eight, one, rtol=1e-6, atol=1e-6)
    assert embed_sharded(ours.text_features, ids[:0]).shape == (0, 16)


def aesthetic_reference(layout):
    """LAION's nn.Linear(768, 1), or improved-aesthetic-predictor's MLP `layers` Sequential
    (linearMSE: no activations; reluMSE: a ReLU after each hidden Linear)."""
    L, drop, relu = torch.nn.Linear, torch.nn.Dropout, torch.nn.ReLU
    if layout == "linear":
        return L(768, 1)
    if layout == "relu":
        layers = [L(768, 1024), relu(), drop(0.2), L(1024, 128), relu(), drop(0.2), L(128, 64),
                  relu(), drop(0.1), L(64, 16), relu(), L(16, 1)]
    else:
        layers = [L(768, 1024), drop(0.2), L(1024, 128), drop(0.2), L(128, 64), drop(0.1),
                  L(64, 16), L(16, 1)]
    model = torch.nn.Module()
    model.layers = torch.nn.Sequential(*layers)
    model.forward = model.layers.forward
    return model


@pytest.mark.parametrize("layout", ["linear", "mlp", "relu", "mlp-safetensors"])
def test_aesthetic_heads_match_torch(tmp_path, layout):
    torch.manual_seed(4)
    ref = aesthetic_reference(layout.removesuffix("-safetensors")).eval()
    if layout.endswith("safetensors"):
        path = str(tmp_path / "head.safetensors")
        torch_save_file(ref.state_dict(), path)
    else:
        path = str(tmp_path / "head.pth")
        torch.save(ref.state_dict(), path)
    emb = torch.nn.functional.normalize(torch.randn(6, 768), dim=-1)
    with torch.no_grad():
        expected = ref(emb)[:, 0].numpy()
    got = np.asarray(load_aesthetic_head(path)(emb.numpy() * 3.0))   # normalised inside
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_errors(tmp_path, dirs):
    with pytest.raises(FileNotFoundError, match="/nonexistent/clip"):
        load_clip("/nonexistent/clip")
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(vit))}.*'vit'.*expected 'clip'"):
        load_clip(str(vit))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(dirs["eos"], "config.json"), bare)
    with pytest.raises(FileNotFoundError, match=re.escape(str(bare))):
        load_clip(str(bare))
    tensors = load_file(os.path.join(dirs["eos"], "model.safetensors"))
    tensors["vision_model.extra.weight"] = tensors.pop("vision_model.post_layernorm.weight")
    tensors["visual_projection.weight"] = tensors["visual_projection.weight"][:, :8]
    save_file(tensors, str(bare / "model.safetensors"))
    with pytest.raises(ValueError, match=r"vision_model\.post_layernorm\.weight.*vision_model\.extra"
                                         r"\.weight.*visual_projection\.weight"):
        load_clip(str(bare))
    with pytest.raises(FileNotFoundError, match="head.pth"):
        load_aesthetic_head(str(tmp_path / "head.pth"))
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="fc.weight"):
        load_aesthetic_head(str(tmp_path / "bad.pth"))
    torch.save({"weight": torch.zeros(2, 768), "bias": torch.zeros(2)}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"mis-shaped.*weight \[2, 768\]"):
        load_aesthetic_head(str(tmp_path / "wide.pth"))


def test_jax_scorers_give_clip_semantic_scores(dirs):
    """config.eval.clip wired through `load_scorers` (jax backend, 8 devices): the semantic scores
    are transformers' CLIP cosines on the same pixels; a DINO path holding a CLIP is refused."""
    from holocine_jax.config import load_config
    from holocine_jax.eval import metrics as M
    from holocine_jax.eval.scorers import load_scorers

    config = load_config("tiny", [f"--config.eval.clip={dirs['eos']}",
                                  "--config.eval.cut_detector=frame_difference"])
    scorers = load_scorers(config)
    frames = np.random.default_rng(5).integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    captions = ["A red circle", "a big red circle"]
    got = M.film_values(frames, [3], scorers=scorers, global_caption="Red!!", captions=captions)
    ref = REFERENCES["eos"]
    pixels = torch.from_numpy(np.asarray(load_clip(dirs["eos"]).pixels(frames))).permute(0, 3, 1, 2)
    tokens = transformers.AutoTokenizer.from_pretrained(dirs["eos"])(
        ["Red!!", *captions], padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = ref.get_image_features(pixel_values=pixels).pooler_output.numpy()
        text = ref.get_text_features(**tokens).pooler_output.numpy()
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    mean = lambda e: unit(unit(e).mean(axis=0))  # noqa: E731
    want = [float(unit(text[0]) @ mean(image))]
    assert got["semantic_global"] == pytest.approx(want, abs=1e-5)
    want = [float(unit(text[1]) @ mean(image[:3])), float(unit(text[2]) @ mean(image[3:]))]
    assert got["semantic_shot"] == pytest.approx(want, abs=1e-5)
    config.eval.dino = dirs["eos"]
    with pytest.raises(ValueError, match="model_type"):
        load_scorers(config)
