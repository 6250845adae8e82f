"""Configs by name, the Wan numbers, and typed `--config.key=value` overrides."""
import pytest

from holocine_jax.config import CONFIG_NAMES, load_config

WAN = {  # dim, ffn_dim, heads, layers, latent channels (DESIGN §4)
    "wan21_t2v_1_3b": (1536, 8960, 12, 30, 16),
    "wan21_t2v_14b": (5120, 13824, 40, 40, 16),
    "wan22_t2v_a14b": (5120, 13824, 40, 40, 16),
    "wan22_ti2v_5b": (3072, 14336, 24, 30, 48),
}


@pytest.mark.parametrize("name", sorted(WAN))
def test_wan_sizes(name):
    m = load_config(name).model
    assert (m.dim, m.ffn_dim, m.num_heads, m.num_layers, m.in_channels) == WAN[name]
    assert m.dim // m.num_heads == 128 and tuple(m.patch_size) == (1, 2, 2)
    assert (m.freq_dim, m.text_dim, m.text_len) == (256, 4096, 512)


def test_a14b_experts_and_ti2v_vae():
    a14b = load_config("wan22_t2v_a14b")
    assert tuple(a14b.experts.names) == ("high", "low") and a14b.experts.boundary == 0.875
    assert (a14b.sample.num_steps, a14b.sample.shift, a14b.sample.guidance_scale) == (50, 5.0, 5.0)
    ti2v = load_config("wan22_ti2v_5b")
    assert ti2v.vae.z_dim == 48 and tuple(ti2v.vae.stride) == (4, 16, 16)


def test_every_named_config_loads_by_name_and_path():
    for name in CONFIG_NAMES:
        assert load_config(name).name == load_config(f"configs/{name}.py").name


def test_overrides_are_typed():
    c = load_config("tiny", ["--config.model.num_layers=3", "--config.model.scan_layers=false",
                             "--config.attention.summary_self_weight=1", "--config.model.patch_size=(1,1,1)",
                             "--config.attention.mode=full"])
    assert c.model.num_layers == 3 and c.model.scan_layers is False
    assert c.attention.summary_self_weight == 1.0 and isinstance(c.attention.summary_self_weight, float)
    assert c.model.patch_size == (1, 1, 1) and c.attention.mode == "full"


@pytest.mark.parametrize("override, error", [
    ("--config.model.num_layers=two", "cannot parse 'two'"),
    ("--config.model.scan_layers=maybe", "expected a boolean"),
    ("--config.modle.dim=3", "did you mean model"),
    ("--config.model.dim", "not of the form"),
])
def test_bad_overrides_say_why(override, error):
    with pytest.raises((ValueError, KeyError), match=error):
        load_config("tiny", [override])


def test_unknown_config_lists_known_ones():
    with pytest.raises(ValueError, match="wan22_t2v_a14b"):
        load_config("wan3")
