"""Wan2.1-T2V-14B as a HoloCine backbone."""
from configs import base


def get_config():
    return base.base_config("wan21_14b", vae="2.1", sampling=base.WAN_SAMPLING["wan21_t2v"])
