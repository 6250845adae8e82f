"""ViT (transformers `ViTModel`, e.g. facebook/dino-vitb16) and DINOv2 (`Dinov2Model`) image
towers in Flax NNX from a local directory (DESIGN §12).

    dino = load_vit("/ckpt/dino-vitb16")                      # model_type "vit" or "dinov2"
    feats = dino.features(imagenet_pixels(frames, 224))       # uint8 [N, H, W, 3] -> [N, D]

`features` is the class token after the final LayerNorm: what DINO's own forward returns and
VBench's subject consistency compares (ViTModel's tanh pooler is not used; its tensors are
skipped). Positions are resized bicubically to the input's patch grid whenever it differs from the
config's, as transformers' `interpolate_pos_encoding` (DINOv2 always does so), so VBench's
non-square frames (shorter side 224) work. DINOv2: layer scale on both residual branches, the
SwiGLU FFN when `use_swiglu_ffn` (hidden (int(D * mlp_ratio * 2 / 3) + 7) // 8 * 8, the fused
`weights_in` holding [gate; up]); its mask token is skipped. Checkpoint names are those
transformers writes: `encoder.layer.3.attention.attention.query.weight`, ... (tables below).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from holocine_jax.eval.towers import (Encoder, TowerArch, layer_norm, load_tower, patch_tokens,
                                      position_table, read_config, renamer, resize_shortest)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# transformers' ViTConfig / Dinov2Config defaults, for keys a config.json leaves out.
DEFAULTS = {
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16,
                num_channels=3, qkv_bias=True),
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                   hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14,
                   num_channels=3, qkv_bias=True, use_swiglu_ffn=False),
}
TOP = {"patch": "embeddings.patch_embeddings.projection.weight",
       "patch_bias": "embeddings.patch_embeddings.projection.bias",
       "cls": "embeddings.cls_token", "pos": "embeddings.position_embeddings"}
STACKS = {"encoder": "encoder.layer"}
ATTENTION = {"attn.q": "attention.attention.query", "attn.k": "attention.attention.key",
             "attn.v": "attention.attention.value", "attn.o": "attention.output.dense"}
LAYER = {
    "vit": {**ATTENTION, "ln1": "layernorm_before", "ln2": "layernorm_after",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"},
    "dinov2": {**ATTENTION, "ln1": "norm1", "ln2": "norm2", "ls1": "layer_scale1.lambda1",
               "ls2": "layer_scale2.lambda1", "mlp.w_in": "mlp.weights_in", "mlp.w_out": "mlp.weights_out"},
}
IGNORED = {"vit": ("pooler.",), "dinov2": ("embeddings.mask_token",)}


def imagenet_pixels(frames, size: int = 224, *, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """uint8 frames [N, H, W, 3] -> float32 [N, H', W', 3] with min(H', W') = size, as VBench's
    `dino_transform`: antialiased bilinear resize of the shorter side (no crop), /255, mean/std."""
    x = resize_shortest(frames, size, "linear")
    return (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@dataclasses.dataclass(frozen=True)
class ViTArch:
    """The encoder stack and embedding sizes of a ViTConfig / Dinov2Config."""
    kind: str              # "vit" | "dinov2"
    tower: TowerArch
    image_size: int
    patch_size: int
    channels: int

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: str = "float32") -> "ViTArch":
        kind = hf["model_type"]
        c = {**DEFAULTS[kind], **hf}
        d, first = c["hidden_size"], lambda v: int(v[0] if isinstance(v, (list, tuple)) else v)  # noqa: E731
        if kind == "vit":
            mlp, swiglu = c["intermediate_size"], False
        else:
            mlp, swiglu = int(d * c["mlp_ratio"]), bool(c["use_swiglu_ffn"])
            mlp = (int(mlp * 2 / 3) + 7) // 8 * 8 if swiglu else mlp
        tower = TowerArch(hidden=d, heads=c["num_attention_heads"], mlp=mlp, layers=c["num_hidden_layers"],
                          eps=c["layer_norm_eps"], act=c["hidden_act"], qkv_bias=bool(c["qkv_bias"]),
                          layer_scale=kind == "dinov2", swiglu=swiglu, dtype=dtype)
        return cls(kind, tower, first(c["image_size"]), first(c["patch_size"]), int(c["num_channels"]))


class ViT(nnx.Module):
    """`features(pixels [N, H, W, C]) -> [N, D]`: the final-LN class token (any H, W >= patch)."""

    def __init__(self, arch: ViTArch, *, rngs: nnx.Rngs):
        a, p = arch.tower, arch.patch_size
        self.arch = arch
        self.patch = nnx.Param(jnp.zeros((a.hidden, arch.channels, p, p), a.dtype))  # PyTorch conv layout
        self.patch_bias = nnx.Param(jnp.zeros((a.hidden,), a.dtype))
        self.cls = nnx.Param(jnp.zeros((1, 1, a.hidden), a.dtype))
        self.pos = nnx.Param(jnp.zeros((1, (arch.image_size // p) ** 2 + 1, a.hidden), a.dtype))
        self.encoder, self.layernorm = Encoder(a, rngs), layer_norm(a, rngs)

    def features(self, pixels: jax.Array) -> jax.Array:
        x, grid = patch_tokens(pixels, self.patch[...], self.patch_bias[...])
        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + position_table(self.pos[...][0], grid)
        return self.layernorm(self.encoder(x)[:, 0])


def load_vit(path: str, *, dtype: str = "float32") -> ViT:
    """ViT from a local transformers ViTModel (model_type "vit") or Dinov2Model ("dinov2") directory."""
    arch = ViTArch.from_hf_config(read_config(path, ("vit", "dinov2"), "load_vit"), dtype)
    rename = renamer(TOP, STACKS, LAYER[arch.kind])
    return load_tower(path, lambda: ViT(arch, rngs=nnx.Rngs(0)), rename, ignore=IGNORED[arch.kind],
                      dtype=dtype, loader="load_vit")
