"""Shot-aware attention: one semantics (reference.py), several executors, one dispatch."""
from holocine_jax.attention.dispatch import cross_attention, shot_attention

__all__ = ["cross_attention", "shot_attention"]
