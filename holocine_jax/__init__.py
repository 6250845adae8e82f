"""holocine-jax: HoloCine multi-shot video diffusion (Wan2.2 DiT) in JAX / Flax NNX."""

__version__ = "0.1.0"
