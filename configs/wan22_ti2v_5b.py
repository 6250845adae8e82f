"""Wan2.2-TI2V-5B: 48 latent channels with the 2.2 VAE (4x16x16)."""
from configs import base


def get_config():
    return base.base_config("wan22_ti2v_5b", vae="2.2", sampling=base.WAN_SAMPLING["wan22_ti2v_5b"])
