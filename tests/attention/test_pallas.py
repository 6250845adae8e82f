"""The Pallas kernels (TPU/Mosaic and GPU/Triton) in interpret mode equal the reference: outputs
and q/k/v gradients on random layouts (1-8 shots, ragged, block padding), all modes, both
summary weights; bf16 inputs within bf16 tolerance; token plans whose keys are another set; the
dispatch routes impl="pallas" to them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.test_xla import random_layouts, rel_err
from holocine_jax.attention import shot_attention
from holocine_jax.attention.pallas_gpu import shot_attention_pallas_gpu
from holocine_jax.attention.pallas_tpu import shot_attention_pallas_tpu
from holocine_jax.attention.plan import make_plan, make_token_plan
from holocine_jax.attention.reference import shot_attention_reference
from holocine_jax.shots import ShotLayout

H, D = 2, 16
KERNELS = {"tpu": shot_attention_pallas_tpu, "gpu": shot_attention_pallas_gpu}


def out_and_grads(attend, q, k, v, ct):
    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * ct), out
    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return (out,) + grads


def check(kernel, layout, mode, weight, *, seed, dtype=jnp.float32, tol=2e-5, block=(16, 16)):
    rng = np.random.default_rng(seed)
    b, length = layout.shot_starts.shape[0], layout.num_tokens
    q, k, v, ct = (jnp.asarray(rng.standard_normal((b, length, H, D)), jnp.float32) for _ in range(4))
    want = out_and_grads(lambda q, k, v: shot_attention_reference(
        q, k, v, layout, mode=mode, summary_self_weight=weight), q, k, v, ct)
    plan = make_plan(layout, mode=mode, block_q=block[0], block_kv=block[1])
    cast = lambda x: x.astype(dtype)
    got = out_and_grads(lambda q, k, v: KERNELS[kernel](
        cast(q), cast(k), cast(v), plan, summary_self_weight=weight, interpret=True), q, k, v, ct)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(g.astype(jnp.float32), w) <= tol, (name, rel_err(g.astype(jnp.float32), w))


CASES = [  # (max shots, frames, (h, w), mode, summary weight): L = 84 or 90, not a block multiple
    (4, 7, (3, 4), "sparse", 2.0),
    (8, 9, (2, 5), "sparse", 1.0),
    (4, 7, (3, 4), "full", 2.0),
    (4, 7, (3, 4), "independent", 2.0),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("max_shots, frames, hw, mode, weight", CASES)
def test_interpret_matches_reference(kernel, max_shots, frames, hw, mode, weight):
    rng = np.random.default_rng(max_shots + frames)
    layout = ShotLayout.stack(random_layouts(rng, 2, frames=frames, hw=hw, max_shots=max_shots))
    check(kernel, layout, mode, weight, seed=frames)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_inputs_within_bf16_tolerance(kernel):
    rng = np.random.default_rng(5)
    layout = ShotLayout.stack(random_layouts(rng, 2, frames=7, hw=(3, 4), max_shots=4))
    check(kernel, layout, "sparse", 2.0, seed=5, dtype=jnp.bfloat16, tol=3e-2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_token_plans_whose_keys_are_another_set(kernel):
    """Queries = the first 48 tokens; keys = the film followed by 16 masked-out copies (the
    shape of context parallelism's window + summaries)."""
    rng = np.random.default_rng(7)
    layout = ShotLayout.stack(random_layouts(rng, 2, frames=8, hw=(2, 4), max_shots=4))
    q, k, v = (jnp.asarray(rng.standard_normal((2, 64, H, D)), jnp.float32) for _ in range(3))
    want = shot_attention_reference(q, k, v, layout, mode="sparse")
    shot, summary = layout.token_shot_id(), layout.token_is_summary()
    k_shot = jnp.concatenate([shot, jnp.full((2, 16), -1)], axis=1)
    k_summary = jnp.concatenate([summary, jnp.ones((2, 16), bool)], axis=1)
    plan = make_token_plan(shot[:, :48], k_shot, k_summary, mode="sparse", block_q=16, block_kv=16)
    pad = lambda x: jnp.concatenate([x, x[:, :16]], axis=1)
    got = KERNELS[kernel](q[:, :48], pad(k), pad(v), plan, interpret=True)
    assert rel_err(got, want[:, :48]) <= 2e-5


def test_dispatch_routes_pallas():
    """impl="pallas" + interpret=True runs the TPU kernel in the interpreter on this CPU."""
    rng = np.random.default_rng(7)
    layout = ShotLayout.stack(random_layouts(rng, 2, frames=7, hw=(3, 4), max_shots=4))
    q, k, v = (jnp.asarray(rng.standard_normal((2, 84, H, D)), jnp.float32) for _ in range(3))
    want = shot_attention_reference(q, k, v, layout, mode="sparse")
    got = shot_attention(q, k, v, layout, impl="pallas", interpret=True, block_q=16, block_kv=16)
    assert rel_err(got, want) <= 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seed", range(6))
def test_interpret_sweep(kernel, seed):
    rng = np.random.default_rng(100 + seed)
    frames = int(rng.integers(8, 13))
    layout = ShotLayout.stack(random_layouts(rng, 2, frames=frames, hw=(3, 5), max_shots=8))
    for mode in ("sparse", "full", "independent"):
        check(kernel, layout, mode, float(rng.choice([1.0, 2.0])), seed=seed, block=(16, 32))


def test_gpu_kernels_lower_through_triton_without_a_gpu():
    """Exporting for CUDA runs the Pallas -> Triton lowering on this host (no GPU needed): the
    forward is one Triton kernel, fwd+bwd three (fwd, dQ, dK/dV), at head_dim 128 in bf16."""
    import re

    from holocine_jax.shots import even_cuts
    layout = ShotLayout.from_cuts(33, even_cuts(33, 3), latent_hw=(8, 16), max_shots=4).broadcast_to_batch(1)
    plan = make_plan(layout, mode="sparse", block_q=64, block_kv=64)
    x = jax.ShapeDtypeStruct((1, layout.num_tokens, 4, 128), jnp.bfloat16)
    fwd = lambda q, k, v: shot_attention_pallas_gpu(q, k, v, plan)
    bwd = lambda q, k, v: jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), (0, 1, 2))(q, k, v)
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    for fn, kernels in ((fwd, {"_fwd_kernel"}), (bwd, {"_fwd_kernel", "_dq_kernel", "_dkv_kernel"})):
        text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(x, x, x).mlir_module()
        assert text.count("@__gpu$xla.gpu.triton") == len(kernels)
        assert set(re.findall(r'name = "(_\w+_kernel)"', text)) == kernels
