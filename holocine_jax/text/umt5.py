"""UMT5 encoder in Flax NNX (DESIGN §7), parameter paths named like transformers' `UMT5EncoderModel`.

    encoder = UMT5Encoder(UMT5Arch(vocab_size=..., d_model=4096, ...), rngs=nnx.Rngs(0))
    states = encoder(input_ids, attention_mask)         # [B, L, D], zero where the mask is 0

Paths: `shared.embedding` (= `shared.weight`), `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}`,
`...SelfAttention.relative_attention_bias` (every layer has its own, unlike T5),
`...layer.0.layer_norm`, `...layer.1.DenseReluDense.{wi_0,wi_1,wo}` (gated) or `{wi,wo}`,
`...layer.1.layer_norm`, `encoder.final_layer_norm`. Linear kernels are [in, out] (transposed);
norm weights are `scale`. T5 attention has no 1/sqrt(d) scaling and no biases; its layer norm is an
RMS norm (no mean, no bias) computed in float32.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from holocine_jax.model.layers import rms_norm, with_axes

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class UMT5Arch:
    """Hyper-parameters, named like transformers' `UMT5Config` (UMT5-XXL numbers as defaults)."""
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True
    dtype: str = "bfloat16"        # matmul / activation dtype (norms and softmax stay float32)
    param_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"UMT5 dense_act_fn {self.dense_act_fn!r} is not one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> "UMT5Arch":
        """From a transformers `config.json` dict (`feed_forward_proj` 'gated-gelu' -> gelu_new)."""
        proj = hf.get("feed_forward_proj", "gated-gelu")
        act = proj.split("-")[-1]
        act = "gelu_new" if proj == "gated-gelu" else hf.get("dense_act_fn", act)
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in hf.items() if k in fields - {"dense_act_fn", "is_gated_act", "dtype"}}
        return cls(**kw, dense_act_fn=act, is_gated_act=proj.startswith("gated-"), **overrides)


def _linear(arch: UMT5Arch, n_in: int, n_out: int, axes: tuple, rngs: nnx.Rngs) -> nnx.Linear:
    """Bias-free Linear, kernel [n_in, n_out] ~ N(0, n_in^-0.5) with logical `axes`."""
    init = nnx.initializers.normal(n_in**-0.5)
    return nnx.Linear(n_in, n_out, use_bias=False, dtype=jnp.dtype(arch.dtype),
                      param_dtype=jnp.dtype(arch.param_dtype), kernel_init=with_axes(init, *axes),
                      rngs=rngs)


def _norm(arch: UMT5Arch, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return rms_norm(arch.d_model, "embed", eps=arch.layer_norm_epsilon,
                    param_dtype=jnp.dtype(arch.param_dtype), rngs=rngs)


def relative_position_bucket(relative_position: jax.Array, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """Bidirectional T5 buckets of `relative_position` = key position - query position.

    Half the buckets are for keys after the query; within each half, distances below
    num_buckets // 4 get exact buckets, larger ones log-spaced buckets up to `max_distance`.
    """
    half = num_buckets // 2
    bucket = jnp.where(relative_position > 0, half, 0)
    distance = jnp.abs(relative_position)
    max_exact = half // 2
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
    large = max_exact + (log_ratio / math.log(max_distance / max_exact) * (half - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, half - 1)
    return bucket + jnp.where(distance < max_exact, distance, large)


class UMT5Attention(nnx.Module):
    """Self-attention with its own relative position bias. x: [B, L, D] -> [B, L, D]."""

    def __init__(self, arch: UMT5Arch, rngs: nnx.Rngs):
        self.arch = arch
        inner = arch.num_heads * arch.d_kv
        self.q = _linear(arch, arch.d_model, inner, ("embed", "heads"), rngs)
        self.k = _linear(arch, arch.d_model, inner, ("embed", "heads"), rngs)
        self.v = _linear(arch, arch.d_model, inner, ("embed", "heads"), rngs)
        self.o = _linear(arch, inner, arch.d_model, ("heads", "embed"), rngs)
        self.relative_attention_bias = nnx.Embed(
            arch.relative_attention_num_buckets, arch.num_heads,
            param_dtype=jnp.dtype(arch.param_dtype), dtype=jnp.float32,
            embedding_init=with_axes(nnx.initializers.normal(arch.d_model**-0.5), None, None),
            rngs=rngs)

    def position_bias(self, length: int) -> jax.Array:
        """[H, L, L] bias added to the attention logits."""
        pos = jnp.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.arch.relative_attention_num_buckets,
                                           self.arch.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x: [B, L, D]; key_mask: [B, L] bool (False: padding, never attended to)."""
        b, length, _ = x.shape
        heads = lambda t: t.reshape(b, length, self.arch.num_heads, self.arch.d_kv)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits + self.position_bias(length)[None]
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, -1)
        return self.o(out)


class UMT5DenseGatedActDense(nnx.Module):
    """`wo(act(wi_0 x) * wi_1 x)`; x: [B, L, D] -> [B, L, D]."""

    def __init__(self, arch: UMT5Arch, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[arch.dense_act_fn]
        self.wi_0 = _linear(arch, arch.d_model, arch.d_ff, ("embed", "mlp"), rngs)
        self.wi_1 = _linear(arch, arch.d_model, arch.d_ff, ("embed", "mlp"), rngs)
        self.wo = _linear(arch, arch.d_ff, arch.d_model, ("mlp", "embed"), rngs)

    def __call__(self, x):
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class UMT5DenseActDense(nnx.Module):
    """`wo(act(wi x))`; x: [B, L, D] -> [B, L, D]."""

    def __init__(self, arch: UMT5Arch, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[arch.dense_act_fn]
        self.wi = _linear(arch, arch.d_model, arch.d_ff, ("embed", "mlp"), rngs)
        self.wo = _linear(arch, arch.d_ff, arch.d_model, ("mlp", "embed"), rngs)

    def __call__(self, x):
        return self.wo(self.act(self.wi(x)))


class UMT5LayerSelfAttention(nnx.Module):
    def __init__(self, arch: UMT5Arch, rngs: nnx.Rngs):
        self.SelfAttention = UMT5Attention(arch, rngs)
        self.layer_norm = _norm(arch, rngs)

    def __call__(self, x, key_mask):
        return x + self.SelfAttention(self.layer_norm(x).astype(x.dtype), key_mask)


class UMT5LayerFF(nnx.Module):
    def __init__(self, arch: UMT5Arch, rngs: nnx.Rngs):
        ff = UMT5DenseGatedActDense if arch.is_gated_act else UMT5DenseActDense
        self.DenseReluDense = ff(arch, rngs)
        self.layer_norm = _norm(arch, rngs)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x).astype(x.dtype))


class UMT5Block(nnx.Module):
    def __init__(self, arch: UMT5Arch, rngs: nnx.Rngs):
        self.layer = nnx.List([UMT5LayerSelfAttention(arch, rngs), UMT5LayerFF(arch, rngs)])

    def __call__(self, x, key_mask):
        return self.layer[1](self.layer[0](x, key_mask))


class UMT5Stack(nnx.Module):
    def __init__(self, arch: UMT5Arch, rngs: nnx.Rngs):
        self.block = nnx.List([UMT5Block(arch, rngs) for _ in range(arch.num_layers)])
        self.final_layer_norm = _norm(arch, rngs)


class UMT5Encoder(nnx.Module):
    """transformers' `UMT5EncoderModel`: token ids -> contextual states.

    `__call__(input_ids [B, L] int, attention_mask [B, L] 0/1) -> [B, L, d_model]` float32, zero
    where attention_mask is 0 (Wan keeps only the first `sum(mask)` states and pads with zeros).
    """

    def __init__(self, arch: UMT5Arch, *, rngs: nnx.Rngs):
        self.arch = arch
        self.shared = nnx.Embed(arch.vocab_size, arch.d_model, dtype=jnp.dtype(arch.dtype),
                                param_dtype=jnp.dtype(arch.param_dtype),
                                embedding_init=with_axes(nnx.initializers.normal(1.0), "vocab", "embed"),
                                rngs=rngs)
        self.encoder = UMT5Stack(arch, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
            raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} "
                             "must both be [B, L]")
        key_mask = attention_mask > 0
        x = self.shared(input_ids)
        for block in self.encoder.block:
            x = block(x, key_mask)
        x = self.encoder.final_layer_norm(x).astype(jnp.float32)
        return x * key_mask[..., None]
