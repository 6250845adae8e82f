"""VAE import: diffusers folders, official Wan names (checked with diffusers' own converter), errors."""
import inspect
import json
import re

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan as TorchWanVAE
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from flax import nnx
from safetensors.numpy import save_file

from configs.base import WAN_VAE_LATENTS, WAN_VAES
from holocine_jax.config import load_config
from holocine_jax.vae import AutoencoderKLWan, WanVAEArch, load_diffusers_vae, load_official_vae, make_vae
from holocine_jax.vae.weights import CheckpointMismatchError, official_to_diffusers_vae, vae_layout
from vae_cases import ARCHS, torch_vae

_RES = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
        "conv_shortcut": "shortcut"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2", "conv_in": "conv1", "norm_out": "head.0",
        "conv_out": "head.2", "mid_block.resnets.0": "middle.0", "mid_block.attentions.0": "middle.1",
        "mid_block.resnets.1": "middle.2"}


def official_name(name: str, arch: dict) -> str:
    """Test scaffold: a diffusers name written the official way (vae2_1.py / vae2_2.py modules)."""
    r = arch["num_res_blocks"]
    for src, dst in _TOP.items():
        name = re.sub(rf"(^|\.){re.escape(src)}\.", rf"\g<1>{dst}.", name)
    m = re.match(r"^((?:encoder|decoder)\.middle\.[02]\.)(\w+)\.(.*)$", name)
    if m:
        return f"{m.group(1)}{_RES[m.group(2)]}.{m.group(3)}"
    m = re.match(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(.*)$", name)
    if m:
        side, i, rest = m.group(1), int(m.group(3)), m.group(4)
        m2 = re.match(r"^(resnets\.(\d+)|upsamplers\.0|upsampler|downsampler)\.(.*)$", rest)
        if m2 is None:  # 2.1 encoder: down_blocks is already one flat list, as downsamples
            m2 = re.match(r"^()()(.*)$", rest)
        j = int(m2.group(2)) if m2.group(2) else (r if m2.group(1) == "downsampler" else r + 1)
        inner = m2.group(3)
        for src, dst in _RES.items():
            inner = re.sub(rf"^{src}\.", f"{dst}.", inner)
        plural = "downsamples" if side == "encoder" else "upsamples"
        if arch.get("is_residual"):
            name = f"{side}.{plural}.{i}.{plural}.{j}.{inner}"
        else:
            name = f"{side}.{plural}.{i if side == 'encoder' else i * (r + 2) + j}.{inner}"
    return name


def state_dict(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def params(vae):
    return jax.tree.leaves(nnx.state(vae, nnx.Param))


def test_official_21_names_agree_with_diffusers_converter(tmp_path):
    # The converter's tables assume Wan's shape: 2 res blocks, dim_mult (1, 2, 4, 4).
    arch = dict(ARCHS["2.1"], num_res_blocks=2, base_dim=4, dim_mult=[1, 2, 4, 4])
    model = torch_vae("2.1", num_res_blocks=2, base_dim=4, dim_mult=[1, 2, 4, 4])
    diffusers_sd = state_dict(model)
    official = {official_name(k, arch): v for k, v in diffusers_sd.items()}
    converted = convert_wan_vae_to_diffusers(dict(official))
    assert sorted(converted) == sorted(diffusers_sd)
    assert all(official_to_diffusers_vae(o, WanVAEArch.from_dict(arch)) == d
               for o, d in zip(official, diffusers_sd))
    save_file(official, str(tmp_path / "Wan2.1_VAE.safetensors"))
    model.save_pretrained(tmp_path / "diffusers")
    ours = load_official_vae(str(tmp_path / "Wan2.1_VAE.safetensors"), arch)
    ref = load_diffusers_vae(str(tmp_path / "diffusers"))
    assert all(np.array_equal(a, b) for a, b in zip(params(ours), params(ref)))


def test_official_22_names():
    """Names read off the official vae2_2.py modules (Down/Up_ResidualBlock sequentials), R=2."""
    arch = WanVAEArch.from_dict(dict(ARCHS["2.2"], num_res_blocks=2))
    pairs = {
        "encoder.downsamples.0.downsamples.1.residual.3.gamma": "encoder.down_blocks.0.resnets.1.norm2.gamma",
        "encoder.downsamples.1.downsamples.0.shortcut.weight": "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.downsamples.2.downsamples.2.time_conv.bias": "encoder.down_blocks.2.downsampler.time_conv.bias",
        "encoder.downsamples.0.downsamples.2.resample.1.weight": "encoder.down_blocks.0.downsampler.resample.1.weight",
        "decoder.upsamples.0.upsamples.2.residual.6.bias": "decoder.up_blocks.0.resnets.2.conv2.bias",
        "decoder.upsamples.1.upsamples.3.time_conv.weight": "decoder.up_blocks.1.upsampler.time_conv.weight",
        "decoder.middle.1.to_qkv.weight": "decoder.mid_block.attentions.0.to_qkv.weight",
        "encoder.head.2.bias": "encoder.conv_out.bias",
        "conv2.weight": "post_quant_conv.weight",
    }
    assert {o: official_to_diffusers_vae(o, arch) for o in pairs} == pairs


def test_official_22_loads_like_diffusers(tmp_path):
    model = torch_vae("2.2")
    sd = state_dict(model)
    prefixed = {"model." + official_name(k, ARCHS["2.2"]): v for k, v in sd.items()}
    save_file(prefixed, str(tmp_path / "Wan2.2_VAE.safetensors"))
    model.save_pretrained(tmp_path / "diffusers")
    ours = load_official_vae(str(tmp_path / "Wan2.2_VAE.safetensors"), ARCHS["2.2"])
    ref = load_diffusers_vae(str(tmp_path / "diffusers"))
    assert all(np.array_equal(a, b) for a, b in zip(params(ours), params(ref)))
    # make_vae: a file without config.json is read with official names and config.vae's architecture.
    config = load_config("wan22_ti2v_5b", [f"--config.vae.path={tmp_path / 'Wan2.2_VAE.safetensors'}"])
    config.vae.update({k: tuple(v) if isinstance(v, list) else v for k, v in ARCHS["2.2"].items()
                       if k in config.vae})
    assert all(np.array_equal(a, b) for a, b in zip(params(make_vae(config)), params(ref)))


def test_make_vae_loads_a_diffusers_folder_and_checks_the_config(tmp_path):
    torch_vae("2.1").save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline root with vae/
    config = load_config("tiny", ["--config.vae.kind=wan", f"--config.vae.path={tmp_path / 'pipe'}"])
    with pytest.raises(ValueError, match="z_dim=4.*config.vae.z_dim=16"):
        make_vae(config)
    config.vae.z_dim = 4
    assert make_vae(config).z_dim == 4


def test_mismatched_checkpoints_name_the_tensors(tmp_path):
    model = torch_vae("2.1")
    model.save_pretrained(tmp_path)
    sd = state_dict(model)
    del sd["decoder.conv_out.bias"]
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:, :2]
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors \(1\): decoder.conv_out.bias.*"
                                                     r"encoder.conv_in.weight: got \[8, 2, 3, 3, 3\]"):
        load_diffusers_vae(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, _class_name="AutoencoderKL")))
    with pytest.raises(ValueError, match="expected AutoencoderKLWan"):
        load_diffusers_vae(str(tmp_path))
    with pytest.raises(ValueError, match="convert it first"):
        load_official_vae(str(tmp_path / "Wan2.1_VAE.pth"), "2.1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_diffusers_vae(str(tmp_path / "nowhere"))


def test_wan_latent_tables_match_diffusers():
    sig = inspect.signature(TorchWanVAE.__init__).parameters  # diffusers' defaults are Wan 2.1's
    np.testing.assert_array_equal(WAN_VAE_LATENTS["2.1"]["latents_mean"], sig["latents_mean"].default)
    np.testing.assert_array_equal(WAN_VAE_LATENTS["2.1"]["latents_std"], sig["latents_std"].default)
    assert all(len(WAN_VAE_LATENTS["2.2"][k]) == 48 for k in ("latents_mean", "latents_std"))
    assert min(WAN_VAE_LATENTS["2.2"]["latents_std"]) > 0


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_real_size_layout_matches_diffusers(version):
    """configs/base.py's WAN_VAES rows build exactly diffusers' full-size Wan VAEs (names, shapes)."""
    row = WAN_VAES[version]
    with torch.device("meta"):
        ref = TorchWanVAE(**{k: list(v) if isinstance(v, tuple) else v for k, v in row.items() if k != "stride"})
    ours = vae_layout(nnx.eval_shape(lambda: AutoencoderKLWan(WanVAEArch.from_dict(row))))
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == {k: e.shape for k, e in ours.items()}
    assert WanVAEArch.from_dict(row).stride == tuple(row["stride"])
