"""LoRA adapters on the DiT's linears (DESIGN §10).

    spec = LoRASpec.from_config(config.train.lora)       # rank 0: no adapters
    model = WanDiT.from_config(config, rngs=nnx.Rngs(0))  # targeted linears are LoRALinear
    merged = merge_lora(model)                            # W + scale * A @ B, adapters gone

A targeted linear keeps its base `kernel` [in, out] / `bias` [out] and adds `lora_a` [in, r]
(LoRA paper / peft init: kaiming-uniform) and `lora_b` [r, out] (zeros), so a fresh adapter
leaves the model's output unchanged: y = x W + b + scale * ((x A) * gate) B, scale = alpha / r.
`gate` [B, L, r] (per-shot adapters, sampling only) weights each rank column per token; None
applies the adapter everywhere. Adapters are `nnx.LoRAParam` (a subclass of `nnx.Param`), so
`nnx.split(model, nnx.LoRAParam, nnx.Param, ...)` separates them from the frozen base; their
logical axes follow the base kernel's (`lora_a` (in_axis, None), `lora_b` (None, out_axis)).
Target names are the block's linears as diffusers names them (`TARGETS`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
           "ffn.net.0.proj", "ffn.net.2")
# Linears that read text tokens, not video tokens: a per-shot adapter (a gate) skips them.
TEXT_SIDE = ("attn2.to_k", "attn2.to_v")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """rank: adapter rank (0: none); alpha: scale = alpha / rank (0: alpha = rank, scale 1);
    targets: which block linears carry an adapter (names from `TARGETS`)."""

    rank: int = 0
    alpha: float = 0.0
    targets: tuple = TARGETS

    def __post_init__(self):
        if int(self.rank) != self.rank or self.rank < 0:
            raise ValueError(f"config.train.lora.rank={self.rank!r} must be an integer >= 0")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"config.train.lora.targets: unknown {unknown}; the block's linears "
                             f"are {TARGETS}")
        if self.rank and not self.targets:
            raise ValueError("config.train.lora.targets is empty but rank > 0")
        object.__setattr__(self, "targets", tuple(self.targets))

    @classmethod
    def from_config(cls, lora) -> LoRASpec:
        """From `config.train.lora` (None or a missing section: no adapters)."""
        if lora is None:
            return cls()
        return cls(rank=int(lora.rank), alpha=float(lora.alpha), targets=tuple(lora.targets))

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank if self.rank else 0.0

    def at(self, name: str) -> LoRASpec | None:
        """This spec if block linear `name` carries an adapter, else None."""
        return self if self.rank and name in self.targets else None


class LoRALinear(nnx.Linear):
    """`nnx.Linear` plus a low-rank adapter (module docstring). x: [..., in] -> [..., out]."""

    def __init__(self, in_features: int, out_features: int, axes: tuple, spec: LoRASpec, *,
                 name: str, rngs: nnx.Rngs, **linear_kwargs):
        super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
        self.lora_name, self.lora_scale = name, spec.scale
        bound = 1.0 / in_features ** 0.5   # kaiming_uniform(a=sqrt(5)) as torch / peft
        a = jax.random.uniform(rngs.params(), (in_features, spec.rank), self.param_dtype, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, out_sharding=(axes[0], None), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((spec.rank, out_features), self.param_dtype),
                                    out_sharding=(None, axes[1]), eager_sharding=False)

    def __call__(self, x, gate=None):
        y = super().__call__(x)
        if gate is not None and self.lora_name in TEXT_SIDE:
            return y
        dtype = self.dtype or x.dtype
        h = x.astype(dtype) @ self.lora_a[...].astype(dtype)
        if gate is not None:
            h = h * gate.astype(dtype)
        return y + (h @ self.lora_b[...].astype(dtype)) * jnp.asarray(self.lora_scale, dtype)


def lora_delta(linear: LoRALinear) -> jax.Array:
    """scale * A @ B: the adapter as a kernel update [..., in, out] (float32)."""
    a, b = linear.lora_a[...].astype(jnp.float32), linear.lora_b[...].astype(jnp.float32)
    return linear.lora_scale * (a @ b)


def lora_linears(model) -> dict:
    """{path: LoRALinear} of every adapter-carrying linear in `model`."""
    return {path: m for path, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)}
