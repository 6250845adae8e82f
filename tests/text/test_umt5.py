"""UMT5 encoder parity with transformers' UMT5EncoderModel (tiny, random, float32)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from holocine_jax.convert.layout import CheckpointMismatchError
from holocine_jax.text import load_umt5
from holocine_jax.text.umt5 import relative_position_bucket
from holocine_jax.text.weights import official_to_transformers

LENGTHS = (20, 13, 5)  # a padded batch: one full row, two shorter ones


def hf_encoder(feed_forward_proj: str):
    """Tiny random UMT5EncoderModel; few buckets and a short max distance so that the
    logarithmic buckets and the clamp at max_distance are reached within 20 tokens."""
    config = transformers.UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8,
                                     relative_attention_max_distance=12, dropout_rate=0.0,
                                     feed_forward_proj=feed_forward_proj)
    torch.manual_seed(0)
    model = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.4 + (1.0 if "layer_norm" in name else 0.0))
    return model


def batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 64, (len(LENGTHS), max(LENGTHS)))
    mask = (np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    return np.where(mask > 0, ids, 0), mask


def reference(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    return out.numpy() * mask[..., None]


def assert_close(ours, ref):
    scale = np.abs(ref).max()
    err = np.abs(np.asarray(ours) - ref).max()
    assert err <= 1e-5 * scale, f"max abs err {err:.3g} > 1e-5 x scale {scale:.3g}"


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_matches_transformers_on_padded_batch(tmp_path, proj):
    model = hf_encoder(proj)
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # sharded, with an index
    assert list(tmp_path.glob("*.index.json"))
    ours = load_umt5(str(tmp_path), dtype="float32", param_dtype="float32")
    ids, mask = batch()
    out = np.asarray(ours(ids, mask))
    assert_close(out, reference(model, ids, mask))
    assert not out[mask == 0].any()  # states past each real length are zero (Wan)
    # a prompt's states do not depend on the padding after it
    alone = np.asarray(ours(ids[2:3, :LENGTHS[2]], mask[2:3, :LENGTHS[2]]))
    np.testing.assert_allclose(alone[0], out[2, :LENGTHS[2]], atol=1e-5 * np.abs(out).max())


def wan_forward(sd: dict, ids, mask, num_heads: int, buckets) -> np.ndarray:
    """Wan's `T5Encoder.forward` (wan/modules/t5.py) written out over the official names:
    RMS norms, unscaled attention + per-block position bias, `fc2(fc1(x) * gelu_tanh(gate.0(x)))`."""
    norm = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))  # noqa: E731
    gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # noqa: E731
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    x = sd["token_embedding.weight"][ids]
    b, length, _ = x.shape
    masked = torch.zeros(b, 1, 1, length).masked_fill(mask[:, None, None] == 0, torch.finfo(x.dtype).min)
    layers = 1 + max(int(n.split(".")[1]) for n in sd if n.startswith("blocks."))
    for i in range(layers):
        w = lambda n: sd[f"blocks.{i}.{n}.weight"]  # noqa: E731
        h = norm(x, w("norm1"))
        q, k, v = ((h @ w(f"attn.{n}").T).view(b, length, num_heads, -1) for n in "qkv")
        pos = w("pos_embedding.embedding")[buckets].permute(2, 0, 1)[None]
        attn = (torch.einsum("binc,bjnc->bnij", q, k) + pos + masked).softmax(-1)
        x = x + torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, -1) @ w("attn.o").T
        h = norm(x, w("norm2"))
        x = x + (h @ w("ffn.fc1").T * gelu(h @ w("ffn.gate.0").T)) @ w("ffn.fc2").T
    return (norm(x, sd["norm.weight"]) * mask[..., None]).numpy()


def test_official_wan_names(tmp_path):
    model = hf_encoder("gated-gelu")
    official = {}
    for name, tensor in model.state_dict().items():
        if name == "encoder.embed_tokens.weight":
            continue
        src = name.replace("shared.weight", "token_embedding.weight")
        src = src.replace("encoder.final_layer_norm.weight", "norm.weight")
        for hf, wan in [("layer.0.layer_norm", "norm1"), ("layer.0.SelfAttention.relative_attention_bias",
                        "pos_embedding.embedding"), ("layer.0.SelfAttention", "attn"),
                        ("layer.1.layer_norm", "norm2"), ("layer.1.DenseReluDense.wi_0", "ffn.gate.0"),
                        ("layer.1.DenseReluDense.wi_1", "ffn.fc1"), ("layer.1.DenseReluDense.wo", "ffn.fc2")]:
            src = src.replace(hf, wan)
        official[src.replace("encoder.block.", "blocks.")] = tensor.clone()
    assert all(official_to_transformers(n) for n in official)
    file = tmp_path / "models_t5_umt5-enc.safetensors"
    save_file(official, str(file))
    ours = load_umt5(str(file), dtype="float32", param_dtype="float32")
    # the official file has no config: Wan's max distance 128 is assumed
    assert ours.arch.relative_attention_max_distance == 128 and ours.arch.num_layers == 2
    ids, mask = batch()
    attn = model.encoder.block[0].layer[0].SelfAttention
    attn.relative_attention_max_distance = 128  # transformers' bucketing, with Wan's distance
    pos = torch.arange(ids.shape[1])
    buckets = attn._relative_position_bucket(pos[None] - pos[:, None])
    with torch.no_grad():
        want = wan_forward(official, ids, mask, num_heads=4, buckets=buckets)
    assert_close(ours(ids, mask), want)


def test_bfloat16_error_is_like_transformers(tmp_path):
    """bfloat16 weights + compute (the released dtype): our error against float32 is of the size
    of transformers' own bfloat16 error."""
    model = hf_encoder("gated-gelu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    ids, mask = batch()
    want = reference(model, ids, mask)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    theirs_err = np.abs(theirs.float().numpy() * mask[..., None] - want).max()
    ours = load_umt5(str(tmp_path))  # dtype from config.json: bfloat16
    assert ours.shared.embedding.dtype == jnp.bfloat16
    err = np.abs(np.asarray(ours(ids, mask)) - want).max()
    assert err <= 2 * theirs_err, (err, theirs_err)


def test_buckets_match_transformers():
    model = hf_encoder("gated-gelu")
    attn = model.encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(-300, 301)[None]
    ref = attn._relative_position_bucket(rel).numpy()
    ours = relative_position_bucket(np.arange(-300, 301)[None], 8, 12)
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_mismatched_checkpoint_names_every_problem(tmp_path):
    model = hf_encoder("gated-gelu")
    state = {k: v.clone() for k, v in model.state_dict().items() if "embed_tokens" not in k}
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    state["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(3, 3)
    model.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing.*wo\.weight.*mis-shaped.*q\.weight"):
        load_umt5(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_umt5(str(tmp_path))
