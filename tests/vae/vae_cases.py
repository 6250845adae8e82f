"""Tiny random diffusers `AutoencoderKLWan` models (2.1- and 2.2-style) and array converters."""
import numpy as np
import torch
from diffusers import AutoencoderKLWan as TorchWanVAE

# Wan's geometry (4 stages, temporal down in the last two) at a few channels.
ARCHS = {
    "2.1": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True]),
    "2.2": dict(base_dim=8, decoder_base_dim=12, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                in_channels=12, out_channels=12, scale_factor_spatial=16),
}


def torch_vae(version: str, seed: int = 0, **overrides) -> TorchWanVAE:
    """A diffusers VAE with every weight perturbed (gammas away from 1, biases away from 0)."""
    torch.manual_seed(seed)
    model = TorchWanVAE(**{**ARCHS[version], **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def pixel_size(version: str) -> int:
    """Frame side giving a 2x2 latent grid."""
    return 2 * 8 * (ARCHS[version].get("patch_size") or 1)


def to_torch(x: np.ndarray) -> torch.Tensor:
    """[B, T, H, W, C] -> torch [B, C, T, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def from_torch(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 4, 1)


def torch_encode(model, video: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return from_torch(model.encode(to_torch(video)).latent_dist.mean)


def torch_decode(model, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return from_torch(model.decode(to_torch(latents)).sample)
