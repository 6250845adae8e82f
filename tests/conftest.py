"""Shared fixtures: tiny float32 configs (the dummy-config pattern of Flax's examples).

Eight fake CPU devices for the multi-device tests (set before jax initialises its backends);
single-device programs still run on device 0. The suite is bound by XLA:CPU compile time on
tiny shapes, so the backend (LLVM) optimisation level is 0: it compiles ~40% faster and computes
the same operations (no fast-math either way). Subprocesses inherit it (the resume workers set
their own flags); benchmarks and the installed CLI keep XLA's default.
"""
import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
     "--xla_backend_optimization_level=0"]).strip()

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
