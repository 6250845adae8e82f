"""Embedders from local transformers checkpoints in PyTorch on the host CPU (config.eval.backend
"torch"; the default is the Flax towers of clip.py / vit.py).

- `TransformersImageEmbedder(path)`: any vision model directory with an image processor (CLIP,
  SigLIP, DINOv2, ...): CLIP-style `get_image_features` when the model has it, else the pooled
  output (ViT / DINO: the final CLS token), else the mean of the last hidden states. frames [N, H, W, 3] uint8 -> [N, D].
- `ClipTextEmbedder(path)`: a CLIP model + processor directory; captions -> [K, P] text
  features (`metrics.film_values` takes their cosine with the frames' image features).
"""
from __future__ import annotations

import os

import numpy as np


def _load(path: str, kind: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{kind} {path!r} is not a directory (a local transformers model)")
    import torch  # noqa: F401  (the PyTorch extra: only needed for these scorers)
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return processor, model


def _features(out):
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state.mean(dim=1)
    return out  # get_*_features returns a tensor


def image_features(processor, model, frames: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """[N, D] features of uint8 frames [N, H, W, 3] (see the module docstring)."""
    import torch

    images = getattr(processor, "image_processor", processor)
    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch_size):
            pixels = images(images=list(frames[i:i + batch_size]), return_tensors="pt")["pixel_values"]
            if hasattr(model, "get_image_features"):
                feats = _features(model.get_image_features(pixel_values=pixels))
            elif model.config.model_type == "vit":  # DINO: the CLS token, not ViT's tanh pooler
                feats = model(pixel_values=pixels).last_hidden_state[:, 0]
            else:
                feats = _features(model(pixel_values=pixels))
            out.append(feats.float().numpy())
    return np.concatenate(out)


class TransformersImageEmbedder:
    """Per-frame embeddings from a local vision model directory."""

    def __init__(self, path: str, batch_size: int = 32):
        self.processor, self.model = _load(path, "image embedder")
        self.batch_size = batch_size

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return image_features(self.processor, self.model, frames, self.batch_size)


class ClipTextEmbedder:
    """CLIP text features [K, P] of captions from a local CLIP model directory."""

    def __init__(self, path: str):
        self.processor, self.model = _load(path, "text embedder")
        if not hasattr(self.model, "get_text_features"):
            raise ValueError(f"text embedder {path!r} has no text tower (expected a CLIP model)")

    def __call__(self, captions) -> np.ndarray:
        import torch

        tokens = self.processor.tokenizer(list(captions), return_tensors="pt", padding=True,
                                          truncation=True)
        with torch.no_grad():
            return _features(self.model.get_text_features(**tokens)).float().numpy()
