"""Wan VAE 2.1 / 2.2 == diffusers' AutoencoderKLWan (the independent reference), float32."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from holocine_jax.vae import AutoencoderKLWan, WanVAEArch, load_diffusers_vae
from holocine_jax.vae.wan import decode_jit, encode_jit
from vae_cases import ARCHS, pixel_size, torch_decode, torch_encode, torch_vae


@pytest.fixture(scope="module", params=sorted(ARCHS))
def pair(request, tmp_path_factory):
    """(version, diffusers model, our model loaded from its save_pretrained folder)."""
    model = torch_vae(request.param)
    path = tmp_path_factory.mktemp(f"vae{request.param}")
    model.save_pretrained(path)
    return request.param, model, load_diffusers_vae(str(path))


def _err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / max(np.max(np.abs(ref)), 1e-6))


# LLVM optimisation level 0: half the CPU compile time; the HLO program and its buffer
# assignment (what memory_analysis reports) are the same.
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def compiled(pair):
    """get(kind, latent_frames) -> the compiled `encode_jit` / `decode_jit` program (batch 1), cached."""
    version, _, vae = pair
    graphdef, state = nnx.split(vae)
    s, zc = pixel_size(version), ARCHS[version]["z_dim"]
    cache = {}

    def get(kind, f):
        if (kind, f) not in cache:
            shape = (1, f, 2, 2, zc) if kind == "decode" else (1, 4 * (f - 1) + 1, s, s, 3)
            fn = decode_jit if kind == "decode" else encode_jit
            program = fn.lower(graphdef, state, jax.ShapeDtypeStruct(shape, jnp.float32)).compile(FAST)
            cache[kind, f] = functools.partial(program, state), program.memory_analysis()
        return cache[kind, f]
    return get


@pytest.mark.parametrize("frames", [1, pytest.param(5, marks=pytest.mark.slow),
                                    pytest.param(9, marks=pytest.mark.slow), 13])
def test_encode_decode_match_diffusers(pair, compiled, frames):
    version, model, vae = pair
    s = pixel_size(version)
    video = np.random.default_rng(frames).uniform(-1, 1, (1, frames, s, s, 3)).astype(np.float32)
    ref = torch_encode(model, video)
    z = ref * 0.5  # latents of the reference, scaled so that few pixels clip
    ref_video = torch_decode(model, z)
    assert np.mean(np.abs(ref_video) < 1) > 0.5, "decoder saturates: the comparison would be vacuous"
    f = (frames - 1) // 4 + 1
    latents = compiled("encode", f)[0](jnp.asarray(video))
    out = compiled("decode", f)[0](jnp.asarray(z))
    assert latents.shape == ref.shape == (1, f, 2, 2, ARCHS[version]["z_dim"])
    assert _err(latents, ref) <= 1e-4
    assert out.shape == ref_video.shape == (1, frames, s, s, 3)
    assert _err(out, ref_video) <= 1e-4


def test_public_methods_match_diffusers_on_a_batch(pair):
    """`vae.encode` / `vae.decode` (shape checks, then the jitted programs) on a batch of 2."""
    version, model, vae = pair
    s = pixel_size(version)
    video = np.random.default_rng(3).uniform(-1, 1, (2, 1, s, s, 3)).astype(np.float32)
    latents = vae.encode(jnp.asarray(video))
    assert _err(latents, torch_encode(model, video)) <= 1e-4
    assert _err(vae.decode(latents), torch_decode(model, np.asarray(latents))) <= 1e-4


def test_long_film_compiled_matches_diffusers_in_flat_memory(pair, compiled):
    """The jitted scan over chunks equals diffusers on a long film, and its compiled temp bytes
    (peak working memory) for 8 latent frames are no more than for 4 (outputs do grow)."""
    version, model, _ = pair
    (dec4, dec4_mem), (dec8, dec8_mem) = compiled("decode", 4), compiled("decode", 8)
    (_, enc4_mem), (enc8, enc8_mem) = compiled("encode", 4), compiled("encode", 8)
    assert dec8_mem.output_size_in_bytes > 2 * dec4_mem.output_size_in_bytes
    assert dec8_mem.temp_size_in_bytes <= dec4_mem.temp_size_in_bytes
    assert enc8_mem.temp_size_in_bytes <= enc4_mem.temp_size_in_bytes

    rng = np.random.default_rng(7)
    s, zc = pixel_size(version), ARCHS[version]["z_dim"]
    z = rng.standard_normal((1, 8, 2, 2, zc)).astype(np.float32) * 0.5
    ref = torch_decode(model, z)
    out = dec8(jnp.asarray(z))
    assert out.shape == ref.shape == (1, 29, s, s, 3)
    assert _err(out, ref) <= 1e-4
    video = rng.uniform(-1, 1, (1, 29, s, s, 3)).astype(np.float32)
    assert _err(enc8(jnp.asarray(video)), torch_encode(model, video)) <= 1e-4


def _arch(version):
    return WanVAEArch.from_dict(ARCHS[version])


def test_bad_inputs_are_named():
    vae = nnx.eval_shape(lambda: AutoencoderKLWan(_arch("2.1")))  # errors come before any compute
    with pytest.raises(ValueError, match="6 frames.*4n\\+1"):
        vae.encode(jnp.zeros((1, 6, 16, 16, 3)))
    with pytest.raises(ValueError, match="not a multiple of the VAE stride 8x8"):
        vae.encode(jnp.zeros((1, 5, 12, 16, 3)))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        vae.encode(jnp.zeros((1, 5, 16, 16, 4)))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(jnp.zeros((1, 2, 2, 2, 5)))
    with pytest.raises(ValueError, match="temperal_downsample"):
        WanVAEArch.from_dict(dict(dim_mult=[1, 2], temperal_downsample=[True, True]))
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAEArch.from_dict(dict(attn_scales=[1.0]))
