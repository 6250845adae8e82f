"""Checkpoint conversion: diffusers / official Wan (and DiffSynth/HoloCine) <-> WanDiT."""
from holocine_jax.convert.layout import CheckpointMismatchError
from holocine_jax.convert.wan import load_diffusers, load_official, save_diffusers, save_official

__all__ = ["CheckpointMismatchError", "load_diffusers", "load_official", "save_diffusers", "save_official"]
