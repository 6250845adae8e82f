"""Wan2.1-T2V-1.3B as a HoloCine backbone."""
from configs import base


def get_config():
    return base.base_config("wan21_1_3b", vae="2.1", sampling=base.WAN_SAMPLING["wan21_t2v"])
