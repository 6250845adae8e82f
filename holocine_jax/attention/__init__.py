"""Shot-aware attention: one semantics (reference.py), several executors, one dispatch."""
from holocine_jax.attention.dispatch import attend, cross_attention, shot_attention
from holocine_jax.attention.spec import AttentionSpec

__all__ = ["AttentionSpec", "attend", "cross_attention", "shot_attention"]
