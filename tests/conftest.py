"""Shared fixtures: tiny float32 configs (the dummy-config pattern of Flax's examples)."""
import numpy as np
import pytest

from holocine_jax.config import load_config


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
