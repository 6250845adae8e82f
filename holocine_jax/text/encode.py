"""Prompts -> UMT5 text states; the text stack a config names (DESIGN §7, §9).

    tokenizer, encoder = load_text_stack(config)      # config.text.path, or the seeded tiny pair
    states, ids, mask = encode_text(encoder, tokenizer, prompts, text_len=config.model.text_len)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from holocine_jax.text.tokenizer import load_tokenizer, tokenize, world_tokenizer, world_vocabulary
from holocine_jax.text.umt5 import UMT5Arch, UMT5Encoder
from holocine_jax.text.weights import load_umt5


@nnx.jit
def _forward(encoder: UMT5Encoder, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return encoder(input_ids, attention_mask)


def encode_text(encoder: UMT5Encoder, tokenizer, texts, text_len: int):
    """(states float32 [B, text_len, D], input_ids int32 [B, text_len], attention_mask int32
    [B, text_len]) of `texts`: padded to `text_len`, states past each prompt's length zeroed."""
    ids, mask = tokenize(tokenizer, texts, text_len)
    states = _forward(encoder, jnp.asarray(ids), jnp.asarray(mask))
    return states, ids, mask


def tiny_text_encoder(config) -> UMT5Encoder:
    """The seeded small UMT5 of the synthetic world: d_model = config.model.text_dim, the world
    tokenizer's vocabulary, the other sizes and the seed from config.text."""
    t = config.text
    arch = UMT5Arch(vocab_size=len(world_vocabulary()), d_model=config.model.text_dim, d_kv=t.d_kv,
                    d_ff=t.d_ff, num_layers=t.num_layers, num_heads=t.num_heads, dtype=t.dtype,
                    param_dtype=t.param_dtype)
    return UMT5Encoder(arch, rngs=nnx.Rngs(t.seed))


def load_text_stack(config):
    """(tokenizer, encoder) of config.text: UMT5 + tokenizer from `path` (`tokenizer_path`), or
    with path "" the world tokenizer and the seeded encoder. Checks d_model == model.text_dim."""
    t = config.text
    if not t.path:
        return world_tokenizer(), tiny_text_encoder(config)
    encoder = load_umt5(t.path, dtype=t.dtype, param_dtype=t.param_dtype)
    if encoder.arch.d_model != config.model.text_dim:
        raise ValueError(f"config.text.path {t.path!r} holds a UMT5 of d_model {encoder.arch.d_model}, "
                         f"but config.model.text_dim is {config.model.text_dim}")
    return load_tokenizer(t.tokenizer_path or t.path), encoder

