"""Executors of shot attention on one device's tokens: what the dispatch and the context bodies
run (DESIGN §5). Nothing here looks at a mesh's `context` axis or re-enters the dispatch.

- `dense_attention(q, k, v)`: unmasked attention (`layout=None`, `full` under impl auto): the
  blocked online-softmax `xla.dense_attention_xla` on CPU (no [L, L] buffer; ~3x faster than
  `jax.nn.dot_product_attention` there at L = 4096, benchmarks/shot_attention.py), else
  `jax.nn.dot_product_attention` (XLA's / cuDNN's fused attention on TPU / GPU).
- `attend_local(q, k, v, layout, spec)`: the whole film on this device (or, inside Ulysses'
  shard_map, the whole film for this device's heads): reference masks, `dense_attention` for
  `full` under impl auto, else the block plan on `attend_plan`.
- `attend_plan(q, k, v, plan, spec)`: a block plan on the executor for this platform: impl auto
  is "pallas" on TPU / GPU (the platform of the active mesh's devices, so an AOT compile for a TPU
  topology from a CPU host picks the TPU kernel), "xla" on CPU; `spec.interpret` runs the TPU
  kernel in the Pallas interpreter anywhere.
"""
from __future__ import annotations

import jax

from holocine_jax.attention.plan import make_plan
from holocine_jax.attention.reference import shot_attention_reference
from holocine_jax.attention.spec import AttentionSpec
from holocine_jax.attention.xla import dense_attention_xla, shot_attention_xla


def platform() -> str:
    """'cpu' | 'gpu' | 'tpu': the active mesh's devices, else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def fit_block(block: int, length: int) -> int:
    """A block size clipped to the power of two >= `length` (at least 16): short sequences run
    as one block pair; powers of two stay powers of two."""
    return min(block, max(16, 1 << (length - 1).bit_length()))


def dense_attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v. q: [B, Lq, H, D]; k, v: [B, Lk, H, D]. -> [B, Lq, H, D]."""
    if platform() == "cpu":
        return dense_attention_xla(q, k, v)
    return jax.nn.dot_product_attention(q, k, v)


def attend_local(q, k, v, layout, spec: AttentionSpec):
    """q, k, v: [B, L, H, D], L = layout.num_tokens; layout batched or unbatched. -> [B, L, H, D]."""
    b, length = q.shape[:2]
    if layout.num_tokens != length:
        raise ValueError(f"sequence length {length} != layout tokens {layout.num_tokens} "
                         f"({layout.num_latent_frames} frames x {layout.tokens_per_frame})")
    layout = layout.broadcast_to_batch(b)
    if spec.impl == "auto" and spec.mode == "full":
        return dense_attention(q, k, v)
    if spec.impl == "reference":
        return shot_attention_reference(q, k, v, layout, mode=spec.mode,
                                         summary_self_weight=spec.summary_self_weight)
    plan = make_plan(layout, mode=spec.mode, block_q=fit_block(spec.block_q, length),
                     block_kv=fit_block(spec.block_kv, length))
    return attend_plan(q, k, v, plan, spec)


def attend_plan(q, k, v, plan, spec: AttentionSpec):
    """q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (the plan's token vectors). -> [B, Lq, H, D].

    impl "reference" has no plan executor and runs "xla" here.
    """
    where = platform()
    impl = spec.impl
    if impl == "auto":
        impl = "pallas" if where in ("tpu", "gpu") else "xla"
    weight = spec.summary_self_weight
    if impl == "pallas" and where == "gpu" and not spec.interpret:
        from holocine_jax.attention.pallas_gpu import shot_attention_pallas_gpu
        return shot_attention_pallas_gpu(q, k, v, plan, summary_self_weight=weight)
    if impl == "pallas":
        if where != "tpu" and not spec.interpret:
            raise ValueError(f"impl='pallas' needs a TPU or GPU (this is {where!r}); pass "
                             f"interpret=True to run the kernel in the Pallas interpreter")
        from holocine_jax.attention.pallas_tpu import shot_attention_pallas_tpu
        return shot_attention_pallas_tpu(q, k, v, plan, summary_self_weight=weight,
                                         interpret=spec.interpret)
    return shot_attention_xla(q, k, v, plan, summary_self_weight=weight)
