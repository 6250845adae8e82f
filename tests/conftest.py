"""Shared fixtures: tiny float32 configs (the dummy-config pattern of Flax's examples).

Eight fake CPU devices for the multi-device tests (set before jax initialises its backends);
single-device programs still run on device 0.
"""
import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from holocine_jax.config import load_config  # noqa: E402


# The unit tests' model: the tiny config at half its width and depth (fast to compile).
TEST_MODEL = dict(dim=64, ffn_dim=128, num_layers=2)


def tiny_config(**model):
    """The `tiny` config in float32 with the test model size and `model` fields overridden."""
    config = load_config("tiny", ["--config.model.dtype=float32", "--config.model.param_dtype=float32"])
    config.model.update({**TEST_MODEL, **model})
    return config


@pytest.fixture
def rng():
    return np.random.default_rng(0)
