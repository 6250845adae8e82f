"""The tiny config's DCT autoencoder: Wan geometry, scipy's DCT, reconstruction of world films."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.fft import dct, dctn

from holocine_jax.config import load_config
from holocine_jax.world import make_film
from holocine_jax.vae import DCTAutoencoder, denormalize_latents, make_vae, normalize_latents
from holocine_jax.vae.dct import COLOUR, coefficient_list, dct_matrix


def films(seeds, size=64, frames=33):
    """Synthetic-world films as float32 [B, T, H, W, 3] in [-1, 1]."""
    x = np.stack([make_film(s, height=size, width=size, num_frames=frames)[0] for s in seeds])
    return x.astype(np.float32) / 127.5 - 1.0


def test_dct_matrix_is_scipys_orthonormal_dct2():
    for n in (1, 4, 8):
        np.testing.assert_allclose(dct_matrix(n), dct(np.eye(n), norm="ortho", axis=0), atol=1e-12)


def test_latents_are_scipy_dct_coefficients_with_wan_geometry():
    ae = DCTAutoencoder(16)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 9, 16, 24, 3)).astype(np.float32)
    z = np.asarray(ae.encode(jnp.asarray(x)))
    assert z.shape == (1, 3, 2, 3, 16)  # (9 - 1)/4 + 1 latent frames, 8x8 pixels per cell
    colour = np.einsum("thwc,kc->kthw", x[0].astype(np.float64), COLOUR)  # luma, chroma planes
    for f, frames in ((0, slice(0, 1)), (2, slice(5, 9))):
        for i, j in ((0, 0), (1, 2)):
            block = colour[:, frames, 8 * i:8 * i + 8, 8 * j:8 * j + 8]
            coeffs = dctn(block, norm="ortho", axes=(1, 2, 3))  # [colour, k, u, v]
            want = [coeffs[c, k, u, v] if k < coeffs.shape[1] else 0.0 for c, k, u, v in coefficient_list(16)]
            np.testing.assert_allclose(z[0, f, i, j], want, atol=1e-4)


def test_decode_is_the_projection_onto_the_kept_coefficients():
    ae = DCTAutoencoder(16)
    z = np.random.default_rng(1).standard_normal((2, 3, 2, 2, 16)).astype(np.float32) * 0.1
    z[:, 0, ..., 1] = 0.0  # the first latent frame has no temporal harmonic
    video = ae.decode(jnp.asarray(z))
    assert video.shape == (2, 9, 16, 16, 3)
    np.testing.assert_allclose(np.asarray(ae.encode(video)), z, atol=1e-5)


def test_reconstructs_synthetic_world_films():
    """Measured ~21.5-22.5 dB PSNR on 64x64 films (33 frames); asserted with a 1.5 dB margin."""
    config = load_config("tiny")
    ae = make_vae(config)
    assert isinstance(ae, DCTAutoencoder) and ae.stride == (4, 8, 8) and ae.z_dim == config.model.in_channels
    x = films((100, 101))
    z = ae.encode(jnp.asarray(x))
    assert z.shape == (2, 9, 8, 8, 16)
    y = np.asarray(ae.decode(z))
    psnr = 10 * np.log10(4.0 / np.mean((y - x) ** 2, axis=(1, 2, 3, 4)))
    assert np.all(psnr > 20.0), psnr
    # Normalised with the tiny config's statistics, the DiT sees roughly unit-scale latents.
    n = np.asarray(normalize_latents(z, config)).reshape(-1, 16)
    assert np.all(np.abs(n.mean(0)) < 1.0) and np.all((n.std(0) > 0.5) & (n.std(0) < 2.0)), (n.mean(0), n.std(0))
    np.testing.assert_allclose(np.asarray(denormalize_latents(jnp.asarray(n), config)),
                               np.asarray(z).reshape(-1, 16), atol=1e-4)


def test_bad_inputs_are_named():
    config = load_config("tiny")
    with pytest.raises(ValueError, match="config.vae.latents_mean has 16 values but the latents have 8"):
        normalize_latents(jnp.zeros((1, 1, 2, 2, 8)), config)
    with pytest.raises(ValueError, match="8 frames"):
        DCTAutoencoder(16).encode(jnp.zeros((1, 8, 16, 16, 3)))
    with pytest.raises(ValueError, match="z_dim >= 9"):
        DCTAutoencoder(4)
    config.vae.kind = "vqgan"
    with pytest.raises(ValueError, match="config.vae.kind must be"):
        make_vae(config)
    config.vae.kind = "wan"
    with pytest.raises(ValueError, match="needs config.vae.path"):
        make_vae(config)
