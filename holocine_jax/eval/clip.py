"""CLIP in Flax NNX from a local transformers `CLIPModel` directory, its tokenizer and image
preprocessing, and the LAION aesthetic head (DESIGN §12).

    clip = load_clip("/ckpt/clip-vit-large-patch14")   # config.json + model.safetensors (or shards)
    image = clip.image_features(clip.pixels(frames))   # uint8 [N, H, W, 3] -> [N, 224, 224, 3] -> [N, P]
    text = clip.text_features(ClipTokenizer(path)(["a red circle"]))       # ids [N, 77] -> [N, P]
    head = load_aesthetic_head("sa_0_4_vit_l_14_linear.pth")
    scores = head(image)                                                   # [N]
    embed = ShardedEmbedder(clip.image_features, mesh=mesh, rules=config.mesh.rules)  # towers.py

Vision: patch conv (no bias) + class token + positions (resized bicubically for another input grid,
as `interpolate_pos_encoding=True`), `pre_layrnorm`, the encoder, `post_layernorm` on the class
token, `visual_projection`. Text: token + position embeddings, causal encoder, `final_layer_norm`,
the state at the EOS position, `text_projection`. The pooled position follows transformers'
`CLIPTextTransformer`: a config with eos_token_id == 2 (the value before transformers PR #24773)
takes the argmax of the ids (OpenAI's EOS 49407 is the largest id), any other the first position
holding eos_token_id. No attention mask is needed: pads follow the pooled position and the mask is
causal. Checkpoint names are transformers' (`vision_model.encoder.layers.3.self_attn.q_proj.weight`,
...; see the tables below); `*.position_ids` buffers of older files are skipped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from holocine_jax.convert.safetensors_io import SafetensorsReader
from holocine_jax.eval.towers import (Encoder, TowerArch, center_crop, layer_norm, load_tower,
                                      patch_tokens, position_table, read_config, renamer,
                                      resize_shortest)
from holocine_jax.text.tokenizer import load_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for keys a config.json leaves out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, eos_token_id=49407)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_TOP = {
    "vision.patch": "vision_model.embeddings.patch_embedding.weight",
    "vision.cls": "vision_model.embeddings.class_embedding",
    "vision.pos": "vision_model.embeddings.position_embedding.weight",
    "vision.pre_ln": "vision_model.pre_layrnorm",
    "vision.post_ln": "vision_model.post_layernorm",
    "text.tok": "text_model.embeddings.token_embedding",
    "text.pos": "text_model.embeddings.position_embedding.weight",
    "text.final_ln": "text_model.final_layer_norm",
}
CLIP_STACKS = {"vision.encoder": "vision_model.encoder.layers", "text.encoder": "text_model.encoder.layers"}
CLIP_LAYER = {"ln1": "layer_norm1", "ln2": "layer_norm2", "attn.q": "self_attn.q_proj",
              "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.o": "self_attn.out_proj"}
CLIP_IGNORED = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to `size` (bicubic), centre-crop `crop`, normalise by mean / std."""
    size: int = 224
    crop: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD


def clip_pixels(frames, size: int = 224, *, crop: int | None = None, mean=CLIP_MEAN,
                std=CLIP_STD) -> jax.Array:
    """uint8 frames [N, H, W, 3] -> float32 [N, crop, crop, 3] (crop defaults to size), as VBench's
    `clip_transform`: antialiased bicubic resize of the shorter side, centre crop, /255, mean/std."""
    x = center_crop(resize_shortest(frames, size, "cubic"), size if crop is None else crop)
    return (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def read_image_transform(path: str, image_size: int) -> ImageTransform:
    """The directory's preprocessor_config.json (`size` {"shortest_edge"} or an int, `crop_size`,
    `image_mean`, `image_std`); the model's image_size and CLIP's mean/std where absent."""
    file, cfg = os.path.join(path, "preprocessor_config.json"), {}
    if os.path.isfile(file):
        with open(file) as f:
            cfg = json.load(f)

    def side(v):  # {"shortest_edge": n}, {"height": n, "width": n} or n
        return (v.get("shortest_edge") or v.get("height")) if isinstance(v, dict) else v

    size = side(cfg.get("size")) or image_size
    crop = side(cfg.get("crop_size")) if cfg.get("do_center_crop", True) else None
    return ImageTransform(int(size), int(crop or size), tuple(cfg.get("image_mean", CLIP_MEAN)),
                          tuple(cfg.get("image_std", CLIP_STD)))


@dataclasses.dataclass(frozen=True)
class ClipArch:
    """Both towers and the embedding sizes of a transformers CLIPConfig."""
    vision: TowerArch
    text: TowerArch
    image_size: int
    patch_size: int
    channels: int
    vocab_size: int
    max_positions: int
    eos_token_id: int
    projection_dim: int

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: str = "float32") -> "ClipArch":
        def merged(name, defaults):  # `*_config_dict` overrides `*_config`, as CLIPConfig does
            return {**defaults, **(hf.get(name) or {}), **(hf.get(f"{name}_dict") or {})}

        t, v = merged("text_config", TEXT_DEFAULTS), merged("vision_config", VISION_DEFAULTS)
        tower = lambda c, causal: TowerArch(  # noqa: E731
            hidden=c["hidden_size"], heads=c["num_attention_heads"], mlp=c["intermediate_size"],
            layers=c["num_hidden_layers"], eps=c["layer_norm_eps"], act=c["hidden_act"],
            causal=causal, dtype=dtype)
        eos = t["eos_token_id"]
        return cls(tower(v, False), tower(t, True), int(v["image_size"]), int(v["patch_size"]),
                   int(v["num_channels"]), t["vocab_size"], t["max_position_embeddings"],
                   int(eos[0] if isinstance(eos, (list, tuple)) else eos), hf.get("projection_dim", 512))


class ClipVision(nnx.Module):
    """pixels [N, H, W, C] (normalised) -> post-LN class token [N, D]."""

    def __init__(self, arch: ClipArch, rngs: nnx.Rngs):
        a, p = arch.vision, arch.patch_size
        self.patch = nnx.Param(jnp.zeros((a.hidden, arch.channels, p, p), a.dtype))  # PyTorch conv layout
        self.cls = nnx.Param(jnp.zeros((a.hidden,), a.dtype))
        self.pos = nnx.Param(jnp.zeros(((arch.image_size // p) ** 2 + 1, a.hidden), a.dtype))
        self.pre_ln, self.encoder, self.post_ln = layer_norm(a, rngs), Encoder(a, rngs), layer_norm(a, rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x, grid = patch_tokens(pixels, self.patch[...])
        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + position_table(self.pos[...], grid)
        x = self.encoder(self.pre_ln(x).astype(x.dtype))
        return self.post_ln(x[:, 0])


class ClipText(nnx.Module):
    """input_ids [N, L] (L <= max positions) -> final-LN state at the pooled position [N, D]."""

    def __init__(self, arch: ClipArch, rngs: nnx.Rngs):
        a = arch.text
        self.tok = nnx.Embed(arch.vocab_size, a.hidden, dtype=a.dtype, param_dtype=a.dtype, rngs=rngs)
        self.pos = nnx.Param(jnp.zeros((arch.max_positions, a.hidden), a.dtype))
        self.encoder, self.final_ln = Encoder(a, rngs), layer_norm(a, rngs)
        self.eos_token_id = arch.eos_token_id

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        x = self.tok(input_ids) + self.pos[...][:input_ids.shape[1]]
        x = self.final_ln(self.encoder(x))
        if self.eos_token_id == 2:   # legacy configs: the largest id (first of equals)
            at = jnp.argmax(input_ids, axis=-1)
        else:                        # the first EOS (pads may equal EOS)
            at = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]


class ClipModel(nnx.Module):
    """transformers `CLIPModel`: `image_features(pixels [N, S, S, 3]) -> [N, P]`,
    `text_features(input_ids [N, L]) -> [N, P]` (unnormalised, like get_*_features), `pixels(frames)`
    with the directory's preprocessing."""

    def __init__(self, arch: ClipArch, transform: ImageTransform | None = None, *, rngs: nnx.Rngs):
        self.arch, self.transform = arch, transform or ImageTransform(arch.image_size, arch.image_size)
        self.vision, self.text = ClipVision(arch, rngs), ClipText(arch, rngs)
        dtype = arch.vision.dtype
        proj = lambda n: nnx.Linear(n, arch.projection_dim, use_bias=False, dtype=dtype,  # noqa: E731
                                    param_dtype=dtype, rngs=rngs)
        self.visual_projection, self.text_projection = proj(arch.vision.hidden), proj(arch.text.hidden)
        self.logit_scale = nnx.Param(jnp.zeros((), arch.vision.dtype))

    def image_features(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision(pixels))

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        return self.text_projection(self.text(input_ids))

    def pixels(self, frames) -> jax.Array:
        """uint8 frames [N, H, W, 3] -> [N, crop, crop, 3] (`clip_pixels` with `self.transform`)."""
        t = self.transform
        return clip_pixels(frames, t.size, crop=t.crop, mean=t.mean, std=t.std)


def load_clip(path: str, *, dtype: str = "float32") -> ClipModel:
    """ClipModel from a local transformers CLIPModel directory (model_type "clip")."""
    arch = ClipArch.from_hf_config(read_config(path, ("clip",), "load_clip"), dtype)
    transform = read_image_transform(path, arch.image_size)
    rename = renamer(CLIP_TOP, CLIP_STACKS, CLIP_LAYER)
    return load_tower(path, lambda: ClipModel(arch, transform, rngs=nnx.Rngs(0)), rename,
                      ignore=CLIP_IGNORED, dtype=dtype, loader="load_clip")


class ClipTokenizer:
    """The directory's tokenizer.json as `CLIPTokenizerFast(texts, padding="max_length",
    truncation=True)`: texts -> int32 ids [N, length] with the post-processor's BOS/EOS, truncated
    keeping them, padded with the pad token. length: tokenizer_config's model_max_length capped by
    the config's max_position_embeddings (77)."""

    def __init__(self, path: str, length: int | None = None):
        self.tokenizer = load_tokenizer(path)
        meta = {}
        for name in ("config.json", "special_tokens_map.json", "tokenizer_config.json"):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                with open(file) as f:
                    meta[name] = json.load(f)
        positions = {**TEXT_DEFAULTS, **(meta.get("config.json", {}).get("text_config") or {})}
        limit = meta.get("tokenizer_config.json", {}).get("model_max_length") or 10**9
        self.length = length or min(int(limit), positions["max_position_embeddings"])
        pad = (meta.get("tokenizer_config.json", {}).get("pad_token")
               or meta.get("special_tokens_map.json", {}).get("pad_token"))
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is None or self.tokenizer.token_to_id(pad) is None:
            raise ValueError(f"ClipTokenizer: {path} names no pad token of its vocabulary (pad_token in "
                             f"tokenizer_config.json / special_tokens_map.json: {pad!r})")
        self.tokenizer.enable_truncation(self.length)
        self.tokenizer.enable_padding(length=self.length, pad_id=self.tokenizer.token_to_id(pad),
                                      pad_token=pad)

    def __call__(self, texts) -> np.ndarray:
        return np.asarray([e.ids for e in self.tokenizer.encode_batch(list(texts))], np.int32)


class AestheticHead(nnx.Module):
    """LAION aesthetic score of CLIP image embeddings [N, D] (L2-normalised here) -> [N]: one Linear
    (aesthetic predictor v1, VBench), or the improved predictor's MLP D-1024-128-64-16-1 (dropout is
    inactive at eval; `relu`: the `reluMSE` files' ReLU after each hidden layer)."""

    def __init__(self, sizes: tuple, relu: bool = False, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
        self.relu = relu

    def __call__(self, embeddings: jax.Array) -> jax.Array:
        x = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = jax.nn.relu(x) if self.relu and i < len(self.layers) - 1 else x
        return x[:, 0]


# nn.Sequential indices of the improved predictor's Linear layers: without / with nn.ReLU.
AESTHETIC_MLP = {(0, 2, 4, 6, 7): False, (0, 3, 6, 9, 11): True}


def _read_head(path: str) -> dict:
    if path.endswith(".safetensors"):
        reader = SafetensorsReader(path)
        return {n: reader.get(n) for n in reader.shapes()}
    import torch  # lazily: only .pth heads need it

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"load_aesthetic_head: {path} does not hold a state dict of tensors")
    return {n: v.float().numpy() for n, v in state.items()}


def load_aesthetic_head(path: str) -> AestheticHead:
    """AestheticHead from a local .pth (torch.load(weights_only=True)) or .safetensors file: keys
    `weight` [1, D] + `bias` [1] (sa_0_4_vit_l_14_linear.pth), or `layers.{0,2,4,6,7}.weight/bias`
    (improved-aesthetic-predictor linearMSE) / `layers.{0,3,6,9,11}.*` (its reluMSE files)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_aesthetic_head: no file {path!r}")
    tensors = _read_head(path)
    if set(tensors) == {"weight", "bias"}:
        names, relu = [""], False
    else:
        indices = tuple(sorted({int(m.group(1)) for n in tensors if (m := re.match(r"layers\.(\d+)\.", n))}))
        relu = AESTHETIC_MLP.get(indices)
        names = [f"layers.{i}." for i in indices]
        expected = {n + w for n in names for w in ("weight", "bias")}
        if relu is None or set(tensors) != expected:
            raise ValueError(f"load_aesthetic_head: {path} is not a LAION aesthetic head: tensors "
                             f"{sorted(tensors)}; expected weight, bias (linear) or layers.N.weight/bias "
                             f"for N in (0, 2, 4, 6, 7) or (0, 3, 6, 9, 11) (MLP)")
    shapes = [tensors[n + "weight"].shape for n in names]
    sizes = (shapes[0][-1],) + tuple(s[0] for s in shapes)
    wrong = [f"{n}weight {list(s)}" for n, s, d_in in zip(names, shapes, sizes) if s != (s[0], d_in)]
    wrong += [f"{n}bias {list(tensors[n + 'bias'].shape)}" for n, s in zip(names, shapes)
              if tensors[n + "bias"].shape != (s[0],)]
    if wrong or sizes[-1] != 1:
        raise ValueError(f"load_aesthetic_head: {path}: mis-shaped tensors (a chain of Linear layers "
                         f"ending in 1 output): {wrong or [f'{names[-1]}weight {list(shapes[-1])}']}")
    head = nnx.eval_shape(lambda: AestheticHead(sizes, relu, rngs=nnx.Rngs(0)))
    for layer, name in zip(head.layers, names):
        layer.kernel.set_value(jnp.asarray(tensors[name + "weight"].T, jnp.float32))
        layer.bias.set_value(jnp.asarray(tensors[name + "bias"], jnp.float32))
    return head
