"""The Wan diffusion transformer (`WanTransformer3DModel`) in Flax NNX, channels-last.

    config = load_config("tiny")
    model = WanDiT.from_config(config, rngs=nnx.Rngs(0))
    model = WanDiT(config.model, AttentionSpec.from_config(config.attention), config.mesh.rules,
                   rngs=nnx.Rngs(0))                  # the same: built from what it needs
    v = model(latents, timesteps, text_states, layout)   # [B, F, H, W, C] -> [B, F, H, W, C]
    e = model.embed(latents, timesteps, text_states, layout)        # the same forward, split
    v = model.head(model.run_blocks(e.x, e.context, e.t_mod, e.rope, layout), e.temb,
                   model.token_grid(latents.shape))                  # (what a step cache reuses)

The blocks are stacked along a leading `layers` axis and run under `nnx.scan` (optionally
unrolled), so compile time and HLO size do not grow with depth; remat is a config choice.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from holocine_jax.attention import AttentionSpec
from holocine_jax.model.block import WanTransformerBlock
from holocine_jax.model.embeddings import ConditionEmbedder, patch_embedding
from holocine_jax.model.layers import dense, layer_norm, modulation_table, zeros
from holocine_jax.model.lora import LoRASpec
from holocine_jax.model.rope import rope_tables
from holocine_jax.parallel.mesh import constrain, frozen_rules


class Embedded(NamedTuple):
    """What the block stack reads: x [B, L, dim] float32 video tokens; temb [B, dim] and t_mod
    [B, 6, dim] float32 time embeddings (head / blocks); context [B, Lt, dim] projected text;
    rope: (cos, sin) tables [L, head_dim / 2]."""
    x: jax.Array
    temb: jax.Array
    t_mod: jax.Array
    context: jax.Array
    rope: tuple


REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def _stacked_blocks(m, spec: AttentionSpec, rules, lora: LoRASpec, rngs: nnx.Rngs):
    """`m.num_layers` blocks with parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=m.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return WanTransformerBlock(m, spec, rules, rngs=rngs, lora=lora)

    return create(rngs)


class WanDiT(nnx.Module):
    """Wan2.1 / Wan2.2 DiT.

    config: the model section of a run config (`config.model`: sizes, dtypes, remat); attention:
    how self-attention runs; rules: the logical-axis sharding rules (`config.mesh.rules`).
    """

    def __init__(self, config, attention: AttentionSpec, rules=(), *, rngs: nnx.Rngs,
                 lora: LoRASpec = LoRASpec()):
        m = config
        if m.remat not in REMAT_POLICIES:
            raise ValueError(f"config.model.remat={m.remat!r}; expected one of {REMAT_POLICIES}")
        if m.dim % m.num_heads or (m.dim // m.num_heads) % 2:
            raise ValueError(f"config.model.dim={m.dim} must split into {m.num_heads} heads of even size")
        dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        self.config = ml_collections.FrozenConfigDict(m)  # static: hashable
        self.attention, self.rules = attention, frozen_rules(rules)
        self.patch_size = tuple(m.patch_size)
        self.out_channels = m.out_channels
        self.head_dim = m.dim // m.num_heads
        self.rope_theta = m.rope_theta
        self.remat, self.scan_layers = m.remat, m.scan_layers
        self.dtype = dtype
        self.patch_embedding = patch_embedding(m.in_channels, m.dim, m.patch_size, dtype=dtype,
                                               param_dtype=param_dtype, rngs=rngs)
        self.condition_embedder = ConditionEmbedder(dim=m.dim, freq_dim=m.freq_dim, text_dim=m.text_dim,
                                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lora = lora
        self.lora_shots = None   # per-shot adapters (set_lora_shots): shots of each rank column
        self.blocks = _stacked_blocks(m, attention, self.rules, lora, rngs)
        self.norm_out = layer_norm(m.dim, eps=m.eps, affine=False, param_dtype=param_dtype, rngs=rngs)
        self.proj_out = dense(m.dim, m.out_channels * math.prod(self.patch_size), ("embed", None),
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=zeros)
        self.scale_shift_table = modulation_table(2, m.dim, param_dtype=param_dtype, rngs=rngs)

    @classmethod
    def from_config(cls, config, *, rngs: nnx.Rngs) -> WanDiT:
        """From a run config: `config.model`, `config.attention`, `config.mesh.rules`,
        `config.train.lora` (adapters, when its rank > 0)."""
        lora = LoRASpec.from_config(config.train.get("lora") if "train" in config else None)
        return cls(config.model, AttentionSpec.from_config(config.attention), config.mesh.rules,
                   rngs=rngs, lora=lora)

    def set_lora_shots(self, shots) -> None:
        """Make the adapters per-shot (sampling): `shots` holds, per rank column (lora_a's last
        axis), the shot indices whose video tokens it applies to; None: everywhere. Text-side
        linears (lora.TEXT_SIDE) skip per-shot adapters."""
        if shots is not None:
            shots = tuple(tuple(sorted(int(k) for k in s)) for s in shots)
            if len(shots) != self.lora.rank:
                raise ValueError(f"{len(shots)} per-shot rank columns for adapters of rank "
                                 f"{self.lora.rank}")
        self.lora_shots = shots

    def lora_gate(self, layout, batch: int):
        """[B, L, r] float32 gate of per-shot adapters (None: applied everywhere)."""
        if self.lora_shots is None:
            return None
        if layout is None:
            raise ValueError("per-shot LoRA adapters need a shot layout")
        k = max([layout.max_shots] + [s + 1 for col in self.lora_shots for s in col])
        table = np.zeros((k + 1, self.lora.rank), np.float32)   # row k: padding tokens (-1)
        for r, col in enumerate(self.lora_shots):
            table[list(col), r] = 1.0
        shot = layout.broadcast_to_batch(batch).token_shot_id()
        return jnp.asarray(table)[jnp.where(shot < 0, k, shot)]

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        """(F, h, w) token grid of latents [B, F, H, W, C] after patchify; checks divisibility."""
        _, f, hh, ww, _ = latent_shape
        pt, ph, pw = self.patch_size
        if f % pt or hh % ph or ww % pw:
            raise ValueError(f"latents of shape {tuple(latent_shape)} are not divisible by the patch "
                             f"size {self.patch_size} in (F, H, W)")
        return f // pt, hh // ph, ww // pw

    def __call__(self, latents, timesteps, text_states, layout=None):
        """latents: [B, F, H, W, C]; timesteps: [B] in 0..1000; text_states: [B, Lt, text_dim].

        layout: a batched ShotLayout (shots + text windows) or None (one shot, no windows: Wan).
        Returns the flow prediction [B, F, H, W, C_out] in `dtype`. The same as
        `head(run_blocks(embed(...)), ...)` (the split a step cache uses).
        """
        e = self.embed(latents, timesteps, text_states, layout)
        x = self.run_blocks(e.x, e.context, e.t_mod, e.rope, layout)
        return self.head(x, e.temb, self.token_grid(latents.shape))

    def embed(self, latents, timesteps, text_states, layout=None) -> Embedded:
        """The block stack's inputs (see `Embedded`) from `__call__`'s arguments."""
        b = latents.shape[0]
        grid = self.token_grid(latents.shape)
        if layout is not None and (layout.num_latent_frames, layout.tokens_per_frame) != (
                grid[0], grid[1] * grid[2]):
            raise ValueError(f"the layout is for {layout.num_latent_frames} latent frames x "
                             f"{layout.tokens_per_frame} tokens but the latents give {grid[0]} x "
                             f"{grid[1] * grid[2]} (token grid {grid})")
        x = self.patch_embedding(latents.astype(self.dtype)).reshape(b, -1, self.patch_embedding.out_features)
        temb, t_mod, context = self.condition_embedder(timesteps, text_states.astype(self.dtype))
        frames = None if layout is None else layout.rope_frame_positions()
        rope = rope_tables(self.head_dim, grid, self.rope_theta, frames)
        rules = self.rules
        x = constrain(x.astype(jnp.float32), ("batch", "sequence", "act_embed"), rules)
        context = constrain(context, ("batch", None, None), rules)
        return Embedded(x, temb, t_mod, context, rope)

    def run_blocks(self, x, context, t_mod, rope, layout=None):
        """Scan the stacked blocks over the float32 residual stream x: [B, L, dim] -> [B, L, dim]."""

        rules = self.rules
        gate = self.lora_gate(layout, x.shape[0])

        def step(block, x):
            x = block(x, context, t_mod, rope, layout, gate)
            return constrain(x, ("batch", "sequence", "act_embed"), rules)

        if self.remat != "none":
            step = nnx.remat(step, policy=getattr(jax.checkpoint_policies, self.remat))
        scan = nnx.scan(step, in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                        unroll=1 if self.scan_layers else True)
        return scan(self.blocks, x)

    def head(self, x, temb, grid):
        """Modulated output head + unpatchify: x [B, L, dim] float32, temb [B, dim], grid (F, h,
        w) from `token_grid` -> [B, F, H, W, C_out] in `dtype`."""
        shift, scale = jnp.split(self.scale_shift_table[...].astype(jnp.float32) + temb[:, None], 2, axis=1)
        x = self.proj_out((self.norm_out(x) * (1 + scale) + shift).astype(self.dtype))
        return self._unpatchify(x, grid)

    def _unpatchify(self, x, grid):
        """[B, L, pt*ph*pw*C] (channel order (pt, ph, pw, c)) -> [B, F, H, W, C]."""
        f, h, w = grid
        pt, ph, pw = self.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.out_channels)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(x.shape[0], f * pt, h * ph, w * pw, self.out_channels)


def _rebuilt(model: WanDiT, lora: LoRASpec, params: nnx.State) -> WanDiT:
    """A WanDiT like `model` with adapters `lora`, its parameters from `params` (a full state)."""
    abstract = nnx.eval_shape(lambda: WanDiT(model.config, model.attention, model.rules,
                                             rngs=nnx.Rngs(0), lora=lora))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    return nnx.merge(graphdef, params, rest)


def base_params(model: WanDiT) -> nnx.State:
    """The parameters of `model` without its LoRA adapters."""
    return nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))


def with_lora(model: WanDiT, lora: LoRASpec, *, rngs: nnx.Rngs) -> WanDiT:
    """`model`'s weights (without any adapters it has) plus fresh adapters `lora` (A from
    `rngs`, B zero): the same function as `model` until the adapters train."""
    fresh = WanDiT(model.config, model.attention, model.rules, rngs=rngs, lora=lora)
    nnx.update(fresh, base_params(model))
    return fresh


def merge_lora(model: WanDiT, strength: float = 1.0) -> WanDiT:
    """A WanDiT without adapters whose kernels are W + strength * scale * A @ B (float32 sum,
    cast back to the kernel's dtype)."""
    from holocine_jax.model.lora import lora_delta, lora_linears

    params = base_params(model)
    flat = dict(nnx.to_flat_state(params))
    for path, linear in lora_linears(model).items():
        kernel = flat[(*path, "kernel")]
        merged = kernel[...].astype(jnp.float32) + strength * lora_delta(linear)
        flat[(*path, "kernel")] = kernel.replace(merged.astype(kernel[...].dtype))
    return _rebuilt(model, LoRASpec(), nnx.from_flat_state(list(flat.items())))
