"""Shared fixtures: tiny float32 configs (the dummy-config pattern of Flax's examples)."""
import numpy as np
import pytest

from holocine_jax.config import load_config


def tiny_config(**model):
    """The `tiny` config in float32 with `config.model` fields overridden."""
    config = load_config("tiny", ["--config.model.dtype=float32", "--config.model.param_dtype=float32"])
    config.model.update(model)
    return config


@pytest.fixture
def rng():
    return np.random.default_rng(0)
