"""GPU (Triton) kernel specifics: Wan's head dims 64 and 128 in the interpreter vs the reference,
dK/dV tiles smaller than the plan's blocks, clear errors for shapes Triton cannot take, the
Triton IR compiled for sm_90 by pip `triton` + ptxas without register spills (skipped without
the package), and on a GPU backend the compiled kernel vs the reference (skipped elsewhere).
The shared interpret sweep is in test_pallas.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.test_pallas import out_and_grads
from attention.test_xla import random_layouts, rel_err
from holocine_jax.attention import pallas_gpu
from holocine_jax.attention.pallas_gpu import shot_attention_pallas_gpu
from holocine_jax.attention.plan import make_plan
from holocine_jax.attention.reference import shot_attention_reference
from holocine_jax.shots import ShotLayout


def compare(layout, heads, head_dim, block, *, block_kv=None, weight=2.0, dtype=jnp.float32, interpret=True):
    """Max rel err of (out, dq, dk, dv) of the kernel vs the reference, sparse mode."""
    rng = np.random.default_rng(head_dim)
    shape = (layout.shot_starts.shape[0], layout.num_tokens, heads, head_dim)
    q, k, v, ct = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
    want = out_and_grads(lambda q, k, v: shot_attention_reference(
        q, k, v, layout, summary_self_weight=weight), q, k, v, ct)
    plan = make_plan(layout, block_q=block, block_kv=block_kv or block)
    got = out_and_grads(lambda q, k, v: shot_attention_pallas_gpu(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), plan, summary_self_weight=weight,
        interpret=interpret), q, k, v, ct)
    return {name: rel_err(g.astype(jnp.float32), w)
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}


@pytest.mark.parametrize("head_dim", [pytest.param(64, marks=pytest.mark.slow), 128])
def test_wan_head_dims_in_the_interpreter(head_dim):
    """Ragged shots of 1, 3, 2 frames: 72 tokens in blocks of 32 (padded to 96)."""
    film = ShotLayout.from_latent_cuts(6, [1, 4], latent_hw=(3, 4), max_shots=3)
    layout = film.broadcast_to_batch(1)
    errors = compare(layout, 1, head_dim, 32)
    assert max(errors.values()) <= 2e-5, errors


def test_dkv_tiles_smaller_than_the_blocks(monkeypatch):
    """dK/dV programs own a part of a kv block and step through q blocks in slices: with tiles
    of 16, kv blocks of 32 split in 2 and q blocks of 32 are read in 2 slices (192 tokens:
    6 x 6 blocks, full and partial, lists that differ between kv blocks)."""
    monkeypatch.setattr(pallas_gpu, "_DKV_TILE", 16)
    film = ShotLayout.from_latent_cuts(16, [3, 7, 12], latent_hw=(3, 4), max_shots=4)
    errors = compare(film.broadcast_to_batch(1), 1, 32, 32)
    assert max(errors.values()) <= 2e-5, errors


def test_shapes_triton_cannot_take_are_named():
    layout = ShotLayout.from_latent_cuts(6, [3], latent_hw=(2, 4), max_shots=2)
    layout = layout.broadcast_to_batch(1)
    x = jnp.zeros((1, 48, 2, 32))
    with pytest.raises(ValueError, match="block_q=24"):
        shot_attention_pallas_gpu(x, x, x, make_plan(layout, block_q=24, block_kv=16))
    with pytest.raises(ValueError, match="head_dim=8"):
        y = jnp.zeros((1, 48, 2, 8))
        shot_attention_pallas_gpu(y, y, y, make_plan(layout, block_q=16, block_kv=16))
    plan = make_plan(layout, block_q=16, block_kv=16)
    with pytest.raises(ValueError, match="sequence length 40"):
        shot_attention_pallas_gpu(x[:, :40], x, x, plan)
    with pytest.raises(ValueError, match="kv blocks"):
        shot_attention_pallas_gpu(x, x[:, :16], x[:, :16], plan)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend (Triton)")
@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 3e-2), (jnp.float32, 3e-3)])
def test_compiled_kernel_on_a_gpu(dtype, tol):
    """The compiled kernel (f32 runs TF32 matmuls, hence the looser f32 bound) at blocks 64 and
    head dim 128 on a 2-film batch with ragged shots."""
    rng = np.random.default_rng(3)
    layout = ShotLayout.stack(random_layouts(rng, 2, frames=13, hw=(8, 10), max_shots=6))
    errors = compare(layout, 4, 128, 64, dtype=dtype, interpret=False)
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("block", [64, 128])
def test_triton_compiles_for_sm90_without_register_spills(block, monkeypatch, tmp_path):
    """The Triton IR of the three kernels (head dim 128, bf16) goes through pip `triton`'s
    compiler and ptxas for sm_90a on this CPU host: no register spill stores, shared memory
    within the H100's 227 KiB. Skipped without the `triton` package."""
    import os
    import re
    import subprocess
    import warnings

    triton = pytest.importorskip("triton")
    from jax._src.pallas.triton import pallas_call_registration as registration
    from triton.backends.compiler import GPUTarget

    from holocine_jax.shots import even_cuts
    modules, lower = [], registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
    film = ShotLayout.from_cuts(33, even_cuts(33, 3), latent_hw=(8, 16), max_shots=4)
    plan = make_plan(film.broadcast_to_batch(1), block_q=block, block_kv=block)
    x = jax.ShapeDtypeStruct((1, film.num_tokens, 4, 128), jnp.bfloat16)
    loss = lambda *a: jnp.sum(shot_attention_pallas_gpu(*a, plan).astype(jnp.float32))
    params, pallas_call = {}, pallas_gpu.pl.pallas_call

    def record(kernel, *args, compiler_params, **kwargs):
        params[kernel.func.__name__] = compiler_params
        return pallas_call(kernel, *args, compiler_params=compiler_params, **kwargs)

    monkeypatch.setattr(pallas_gpu.pl, "pallas_call", record)
    jax.export.export(jax.jit(jax.grad(loss, (0, 1, 2))), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, x, x)
    assert len(modules) == len(params) == 3
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
    for text in modules:
        options = params[re.match(r"module @(\w+)", text).group(1)]
        src = tmp_path / "kernel.ttir"
        src.write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = triton.compile(str(src), target=GPUTarget("cuda", 90, 32), options=dict(
                num_warps=options.num_warps, num_stages=options.num_stages))
        (tmp_path / "kernel.ptx").write_text(kernel.asm["ptx"])
        report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(tmp_path / "kernel.ptx"),
                                 "-o", str(tmp_path / "kernel.cubin")], capture_output=True,
                                text=True, check=True).stderr
        assert re.findall(r"(\d+) bytes spill stores", report) == ["0"], report
        assert kernel.metadata.shared <= 227 * 1024
