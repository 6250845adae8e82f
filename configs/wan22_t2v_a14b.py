"""Wan2.2-T2V-A14B, the HoloCine recipe: two 14B experts switched at t = 0.875 * 1000.

`experts.names[0]` ("high") denoises t >= boundary*1000; diffusers stores it as `transformer`,
the low-noise expert as `transformer_2`. Sampling defaults are HoloCine's (DESIGN §3).
"""
from configs import base


def get_config():
    c = base.base_config("wan22_a14b", vae="2.1", sampling=base.HOLOCINE_SAMPLING)
    c.experts.names = ("high", "low")
    c.expert = "high"  # which expert a train/import/export command works on
    return c
