"""The one entry point for attention in the model (DESIGN §5, §15).

Every attention call site in `model/` goes through `shot_attention` (video self-attention) or
`cross_attention` (video -> text). The choice of executor lives here and nowhere else:

- `layout=None`: one shot covering the film, plain attention (`jax.nn.dot_product_attention`).
- impl "reference": dense masks from the ShotLayout predicates (tests, tiny shapes).
- impl "xla": the block plan + blocked XLA executor (every backend; the CPU default).
- impl "pallas": the Pallas kernels (`pallas_tpu` on TPU, `pallas_gpu` on GPU; `interpret=True`
  runs the TPU kernel in the Pallas interpreter anywhere).
- impl "auto": `full` mode -> `jax.nn.dot_product_attention` (no mask needed, fused kernels
  where the backend has them); `sparse` / `independent` -> "pallas" on TPU / GPU, "xla" on CPU.
  The platform is that of the active mesh's devices (so an AOT compile for a TPU topology from
  a CPU host picks the TPU kernel), else the default backend.
- a mesh with `context` > 1 (jax.set_mesh): the film's sequence is split over devices and the
  call goes through `parallel.context.context_shot_attention` (`context_strategy` ulysses |
  shot_aware | auto: the one moving fewer bytes), which runs this function again on each
  device's part.
"""
from __future__ import annotations

import jax

from holocine_jax.attention.plan import make_plan
from holocine_jax.attention.reference import shot_attention_reference
from holocine_jax.attention.xla import shot_attention_xla
from holocine_jax.shots import SELF_ATTENTION_MODES

IMPLS = ("auto", "reference", "xla", "pallas")
CONTEXT_STRATEGIES = ("ulysses", "shot_aware", "auto")
BLOCK_Q = 128   # config: attention.block_q
BLOCK_KV = 128  # config: attention.block_kv


def _platform() -> str:
    """'cpu' | 'gpu' | 'tpu': the active mesh's devices, else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def _context_mesh():
    """The active mesh when it splits the sequence (`context` > 1, not yet inside shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("context", 1) == 1 or "context" in mesh.manual_axes:
        return None
    return mesh


def shot_attention(q, k, v, layout=None, *, mode="sparse", impl="auto",
                   summary_self_weight=2.0, interpret=False, block_q=BLOCK_Q, block_kv=BLOCK_KV,
                   context_strategy="ulysses", context_halo_frames=-1):
    """Self-attention over the concatenated film.

    q, k, v: [B, L, H, D] with L = num_latent_frames * h * w. Returns [B, L, H, D].
    layout: ShotLayout, batched (leading B) or unbatched (broadcast); None = plain attention.
    mode: sparse (HoloCine) | full (HoloCine-Full) | independent (shots do not see each other).
    summary_self_weight: log(w) bias on own-shot summary keys in sparse mode (2.0 = released
    checkpoints, 1.0 = clean mask). `interpret` is for the Pallas kernels only.
    Blocks are clipped to the power of two >= L, so short sequences run as one block pair.
    context_strategy: how a mesh with `context` > 1 splits the film (see module doc);
    context_halo_frames: shot_aware's static halo per side in latent frames (-1: whole film).
    """
    if mode not in SELF_ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {SELF_ATTENTION_MODES}")
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if context_strategy not in CONTEXT_STRATEGIES:
        raise ValueError(f"context_strategy {context_strategy!r} is not one of {CONTEXT_STRATEGIES}")
    if layout is None:
        return jax.nn.dot_product_attention(q, k, v)
    mesh = _context_mesh()
    if mesh is not None:
        from holocine_jax.parallel.context import choose_strategy, context_shot_attention, halo_tokens
        halo = halo_tokens(layout, mesh.shape["context"], context_halo_frames)
        strategy = choose_strategy(context_strategy, layout, mesh, q.shape[2], mode, halo)
        return context_shot_attention(q, k, v, layout, mesh=mesh, strategy=strategy,
                                      mode=mode, impl=impl, summary_self_weight=summary_self_weight,
                                      block_q=block_q, block_kv=block_kv, halo=halo)
    b, length = q.shape[:2]
    if layout.num_tokens != length:
        raise ValueError(f"sequence length {length} != layout tokens {layout.num_tokens} "
                         f"({layout.num_latent_frames} frames x {layout.tokens_per_frame})")
    layout = layout.broadcast_to_batch(b)
    if impl == "auto" and mode == "full":
        return jax.nn.dot_product_attention(q, k, v)
    if impl == "reference":
        return shot_attention_reference(q, k, v, layout, mode=mode,
                                         summary_self_weight=summary_self_weight)
    fit = lambda block: min(block, max(16, 1 << (length - 1).bit_length()))   # powers of 2 stay
    plan = make_plan(layout, mode=mode, block_q=fit(block_q), block_kv=fit(block_kv))
    return attend_plan(q, k, v, plan, impl=impl, summary_self_weight=summary_self_weight,
                       interpret=interpret)


def attend_plan(q, k, v, plan, *, impl="auto", summary_self_weight=2.0, interpret=False):
    """Run a block plan on the executor `impl` picks for this platform (module doc).

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (the plan's token vectors). Returns [B, Lq, H, D].
    """
    platform = _platform()
    if impl == "auto":
        impl = "pallas" if platform in ("tpu", "gpu") else "xla"
    if impl == "pallas" and platform == "gpu" and not interpret:
        from holocine_jax.attention.pallas_gpu import shot_attention_pallas_gpu
        return shot_attention_pallas_gpu(q, k, v, plan, summary_self_weight=summary_self_weight)
    if impl == "pallas":
        if platform != "tpu" and not interpret:
            raise ValueError(f"impl='pallas' needs a TPU or GPU (this is {platform!r}); pass "
                             f"interpret=True to run the kernel in the Pallas interpreter")
        from holocine_jax.attention.pallas_tpu import shot_attention_pallas_tpu
        return shot_attention_pallas_tpu(q, k, v, plan, summary_self_weight=summary_self_weight,
                                         interpret=interpret)
    return shot_attention_xla(q, k, v, plan, summary_self_weight=summary_self_weight)


def cross_attention(q, k, v, layout=None):
    """Video -> text attention. q: [B, L, H, D]; k, v: [B, Lt, H, D]. Returns [B, L, H, D].

    `layout=None` (or a layout without text windows) means every token sees all text. With
    windows: a dense boolean mask from the window predicate (ShotLayout.cross_attention_mask);
    `jax.nn.dot_product_attention` gives disallowed pairs exactly zero weight, which equals the
    official additive -1e4 to float32 precision since every video token sees the global window.
    """
    if layout is None:
        return jax.nn.dot_product_attention(q, k, v)
    layout = layout.broadcast_to_batch(q.shape[0])
    mask = layout.cross_attention_mask(k.shape[1])[:, None]  # [B, 1, L, Lt]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
