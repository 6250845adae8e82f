"""AttentionSpec: one frozen value built from `config.attention`; self-attention holds it,
cross-attention does not; bad values and unknown keys are named."""
import dataclasses

import pytest
from flax import nnx

from conftest import tiny_config
from holocine_jax.attention import AttentionSpec
from holocine_jax.model import WanDiT


def test_from_config_reads_every_key_and_the_configs_start_from_its_defaults():
    config = tiny_config()
    config.attention.update(mode="full", context_strategy="auto", context_halo_frames=3)
    spec = AttentionSpec.from_config(config.attention)
    assert dataclasses.asdict(spec) == {**config.attention.to_dict(), "interpret": False}
    assert hash(spec) == hash(AttentionSpec.from_config(config.attention))   # static, hashable
    base = tiny_config().attention.to_dict()
    assert {k: v for k, v in base.items() if k not in ("block_q", "block_kv")} == {
        k: v for k, v in AttentionSpec.config_fields().items() if k not in ("block_q", "block_kv")}


def test_unknown_keys_and_bad_values_are_named():
    config = tiny_config()
    config.attention.block_size = 64
    with pytest.raises(ValueError, match=r"config.attention has unknown keys \['block_size'\]"):
        AttentionSpec.from_config(config.attention)
    for field, value, message in (("mode", "causal", "attention mode 'causal' is not one of"),
                                  ("impl", "cuda", "attention impl 'cuda' is not one of"),
                                  ("block_q", 0, "attention block_q=0 must be a positive integer"),
                                  ("summary_self_weight", 0.0, "summary_self_weight=0.0 must be > 0")):
        with pytest.raises(ValueError, match=message):
            AttentionSpec(**{field: value})


def test_self_attention_holds_the_spec_and_cross_attention_does_not():
    config = tiny_config()
    config.attention.update(mode="independent", block_q=16)
    model = nnx.eval_shape(lambda: WanDiT.from_config(config, rngs=nnx.Rngs(0)))
    assert model.blocks.attn1.spec == model.attention == AttentionSpec.from_config(config.attention)
    assert model.blocks.attn2.spec is None
    assert model.rules == tuple((name, tuple(a) if isinstance(a, (list, tuple)) else a)
                                for name, a in config.mesh.rules)
