"""Video autoencoders (DESIGN §8): Wan VAE 2.1 / 2.2 and the tiny config's analytic DCT one.

    vae = make_vae(config)                        # config.vae.kind: "wan" (config.vae.path) | "dct"
    z = normalize_latents(vae.encode(video), config)   # video [B, T, H, W, 3] in [-1, 1]
    video = vae.decode(denormalize_latents(z, config))

Both kinds share the interface: `encode(video) -> [B, F, h, w, z]` mean latents (unnormalised),
`decode(latents) -> [B, T, H, W, 3]` in [-1, 1], `stride` (t, h, w) and `z_dim`.
"""
from __future__ import annotations

import os

import jax.numpy as jnp

from holocine_jax.vae.dct import DCTAutoencoder
from holocine_jax.vae.wan import AutoencoderKLWan, WanVAEArch
from holocine_jax.vae.weights import load_diffusers_vae, load_official_vae

__all__ = ["AutoencoderKLWan", "DCTAutoencoder", "WanVAEArch", "denormalize_latents", "load_diffusers_vae",
           "load_official_vae", "make_vae", "normalize_latents"]


def make_vae(config):
    """The autoencoder `config.vae` names: the real Wan VAE loaded from `config.vae.path` (a diffusers
    folder with config.json, else an official-layout safetensors file) or the analytic DCT one."""
    v = config.vae
    if v.kind == "dct":
        return DCTAutoencoder(v.z_dim, tuple(v.stride))
    if v.kind != "wan":
        raise ValueError(f"config.vae.kind must be 'wan' or 'dct', got {v.kind!r}")
    if not v.path:
        raise ValueError("config.vae.kind='wan' needs config.vae.path (a diffusers AutoencoderKLWan "
                         "folder or an official Wan VAE .safetensors file)")
    folder = os.path.join(v.path, "vae") if os.path.isdir(os.path.join(v.path, "vae")) else v.path
    if os.path.isfile(os.path.join(folder, "config.json")):
        vae = load_diffusers_vae(v.path)
    else:
        vae = load_official_vae(v.path, v.to_dict())
    if vae.arch.z_dim != v.z_dim or vae.stride != tuple(v.stride):
        raise ValueError(f"VAE at {v.path} has z_dim={vae.arch.z_dim}, stride={vae.stride} but the config "
                         f"says config.vae.z_dim={v.z_dim}, config.vae.stride={tuple(v.stride)}")
    return vae


def _stats(z, config):
    mean, std = (jnp.asarray(config.vae[k], jnp.float32) for k in ("latents_mean", "latents_std"))
    for key, table in (("latents_mean", mean), ("latents_std", std)):
        if table.shape != (z.shape[-1],):
            raise ValueError(f"config.vae.{key} has {table.size} values but the latents have "
                             f"{z.shape[-1]} channels")
    return mean.astype(z.dtype), std.astype(z.dtype)


def normalize_latents(z, config):
    """VAE latents [..., z] -> the DiT's: (z - latents_mean) / latents_std per channel."""
    mean, std = _stats(z, config)
    return (z - mean) / std


def denormalize_latents(z, config):
    """Inverse of `normalize_latents`: z · latents_std + latents_mean."""
    mean, std = _stats(z, config)
    return z * std + mean
