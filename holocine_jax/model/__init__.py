"""Flax NNX Wan DiT: embeddings, blocks, RoPE, head (DESIGN §4)."""
from holocine_jax.model.transformer import WanDiT

__all__ = ["WanDiT"]
