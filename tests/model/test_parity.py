"""WanDiT == diffusers' WanTransformer3DModel (the independent PyTorch reference), float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from diffusers import WanTransformer3DModel

from conftest import tiny_config
from holocine_jax.convert import load_diffusers
from holocine_jax.convert.layout import to_torch, torch_layout

# (model fields, latent shape [F, H, W]) — odd frame counts, non-square frames, 48 channels.
CASES = {
    "base": (dict(), (3, 8, 6)),
    "no_cross_attn_norm": (dict(cross_attn_norm=False), (5, 4, 4)),
    "single_frame": (dict(num_heads=4, dim=96), (1, 6, 10)),
    "ti2v_48ch": (dict(in_channels=48, out_channels=48), (3, 4, 8)),
}


def torch_model(config, seed=0):
    """A random diffusers model with the architecture of `config.model` (every weight random)."""
    m = config.model
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=tuple(m.patch_size), num_attention_heads=m.num_heads,
        attention_head_dim=m.dim // m.num_heads, in_channels=m.in_channels,
        out_channels=m.out_channels, text_dim=m.text_dim, freq_dim=m.freq_dim, ffn_dim=m.ffn_dim,
        num_layers=m.num_layers, cross_attn_norm=m.cross_attn_norm, eps=m.eps).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.shape == (m.dim,) else 0.0))
    return model


def inputs(config, fhw, batch=2, text_len=7, seed=1):
    r = np.random.default_rng(seed)
    latents = r.standard_normal((batch, *fhw, config.model.in_channels)).astype(np.float32)
    timesteps = np.array([37.5, 913.0][:batch], np.float32)
    text = r.standard_normal((batch, text_len, config.model.text_dim)).astype(np.float32)
    return latents, timesteps, text


def torch_forward(model, latents, timesteps, text):
    out = model(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timesteps),
                torch.from_numpy(text), return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1)


def assert_close(ours, ref, rel=1e-5):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rel * scale, f"max abs err {err:.3e} > {rel} x max|ref| {scale:.3e}"


@pytest.mark.parametrize("case", list(CASES))
def test_imported_diffusers_model_matches(case, tmp_path):
    fields, fhw = CASES[case]
    config = tiny_config(**fields)
    ref_model = torch_model(config)
    ref_model.save_pretrained(tmp_path)  # diffusers' own files: config.json + safetensors
    model = load_diffusers(str(tmp_path), config)
    latents, timesteps, text = inputs(config, fhw)
    with torch.no_grad():
        ref = torch_forward(ref_model, latents, timesteps, text).numpy()
    ours = nnx.jit(lambda m, x, t, s: m(x, t, s))(model, latents, timesteps, text)
    assert ours.shape == ref.shape
    assert_close(ours, ref)


def test_gradients_match_torch_autograd(tmp_path):
    config = tiny_config()
    ref_model = torch_model(config)
    ref_model.save_pretrained(tmp_path)
    model = load_diffusers(str(tmp_path), config)
    latents, timesteps, text = inputs(config, (3, 4, 4))
    target = np.random.default_rng(5).standard_normal(latents.shape).astype(np.float32)

    ref_out = torch_forward(ref_model, latents, timesteps, text)
    ((ref_out - torch.from_numpy(target)) ** 2).mean().backward()
    ref_grads = {n: p.grad.numpy() for n, p in ref_model.named_parameters()}

    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def loss(params, x, t, s):
        out = nnx.merge(graphdef, params)(x, t, s)
        return jnp.mean((out - target) ** 2)

    grads = jax.grad(loss)(params, latents, timesteps, text)
    flat = dict(nnx.to_flat_state(grads))
    layout = torch_layout(model)
    assert set(layout) == set(ref_grads)
    for name, entry in layout.items():
        g = np.asarray(flat[entry.path].get_value())
        g = to_torch(entry.kind, g[entry.layer] if entry.layer is not None else g)
        assert np.all(np.isfinite(g)), name
        assert_close(g, ref_grads[name], rel=1e-4)
