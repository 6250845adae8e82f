"""Building blocks with logical axis names on every parameter (DESIGN §4, §6).

Logical axes: `embed` (model dim), `heads` (heads * head_dim), `mlp` (FFN / wide hidden), `layers`
(added by the layer scan). `parallel/` maps them to mesh axes; creating a layer never shards it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from holocine_jax.model.lora import LoRALinear, LoRASpec

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def with_axes(init, *names):
    """Initializer tagged with logical axis names (applied later by the sharding rules)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def dense(in_features: int, out_features: int, axes: tuple, *, dtype, param_dtype, rngs: nnx.Rngs,
          kernel_init=xavier_uniform, lora: LoRASpec | None = None, name: str = "") -> nnx.Linear:
    """Linear layer; kernel [in, out] with logical `axes`, bias [out] with `axes[1]`. With a
    `lora` spec that targets `name` (a block linear's diffusers name) it is a `LoRALinear`."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=with_axes(kernel_init, *axes),
              bias_init=with_axes(zeros, axes[1]), rngs=rngs)
    spec = lora.at(name) if lora is not None else None
    if spec is not None:
        return LoRALinear(in_features, out_features, axes, spec, name=name, **kw)
    return nnx.Linear(in_features, out_features, **kw)


def rms_norm(dim: int, axis: str, *, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm over the last dim (Wan's q/k norm runs across all heads), computed in float32."""
    return nnx.RMSNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                       use_fast_variance=False, scale_init=with_axes(ones, axis), rngs=rngs)


def layer_norm(dim: int, *, eps: float, affine: bool, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm in float32 (diffusers' FP32LayerNorm); `affine=False` has no parameters."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                         use_bias=affine, use_scale=affine, use_fast_variance=False,
                         scale_init=with_axes(ones, "embed"), bias_init=with_axes(zeros, "embed"),
                         rngs=rngs)


def modulation_table(rows: int, dim: int, *, param_dtype, rngs: nnx.Rngs) -> nnx.Param:
    """`scale_shift_table` [1, rows, dim], initialised randn / sqrt(dim) as in Wan."""
    value = jax.random.normal(rngs.params(), (1, rows, dim), param_dtype) / dim**0.5
    return nnx.Param(value, out_sharding=(None, None, "embed"), eager_sharding=False)


def linear(layer, x, gate=None):
    """`layer(x)`, passing a LoRA `gate` [B, L, r] to adapter-carrying linears."""
    return layer(x, gate) if gate is not None and isinstance(layer, LoRALinear) else layer(x)


class GELUProj(nnx.Module):
    """`Linear -> GELU(tanh)`, named like diffusers' `GELU` activation module (`proj`)."""

    def __init__(self, dim_in: int, dim_out: int, axes: tuple, *, dtype, param_dtype, rngs,
                 lora=None, name=""):
        self.proj = dense(dim_in, dim_out, axes, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          lora=lora, name=f"{name}.proj")

    def __call__(self, x, gate=None):
        return jax.nn.gelu(linear(self.proj, x, gate), approximate=True)


class FeedForward(nnx.Module):
    """diffusers `FeedForward(activation_fn="gelu-approximate")`: `net.0.proj`, `net.2`.

    x: [B, L, dim] -> [B, L, dim]; gate: LoRA gate (lora.py). `net.1` is diffusers' (inactive)
    dropout.
    """

    def __init__(self, dim: int, ffn_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, lora=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
        self.net = nnx.List([
            GELUProj(dim, ffn_dim, ("embed", "mlp"), name="ffn.net.0", **kw),
            nnx.Dropout(0.0),
            dense(ffn_dim, dim, ("mlp", "embed"), name="ffn.net.2", **kw),
        ])

    def __call__(self, x, gate=None):
        return linear(self.net[2], self.net[0](x, gate), gate)
