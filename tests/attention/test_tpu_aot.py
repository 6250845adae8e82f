"""The Pallas TPU kernels compile ahead of time for TPU v5e and v5p from this CPU host (libtpu)
at the Wan shape: 40 heads of 128 split over the 4 chips, L = 61 latent frames x 1560 tokens,
a 5-shot film, bf16. The compiled program does the mask's work (XLA's cost analysis, fed by
each kernel's pl.CostEstimate) within 1.15x, and holds no [L, L] buffer."""
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from holocine_jax.attention.pallas_tpu import shot_attention_pallas_tpu
from holocine_jax.attention.plan import make_plan

pytestmark = [pytest.mark.tpu_aot,
              pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="libtpu (the `tpu` extra) is not installed")]

HEADS, HEAD_DIM = 40, 128
# Backward FLOPs per allowed pair in units of D: the dQ kernel recomputes S and dP and forms
# dS K (3 matmuls), the dK/dV kernel recomputes S and dP and forms P^T dO and dS^T Q (4): 14,
# the split-kernel scheme of splash attention (a fused kernel would need atomics on dQ).
FWD_UNITS, BWD_UNITS = 4, 14


def wan_film():
    from holocine_jax.shots import ShotLayout, even_cuts
    return ShotLayout.from_cuts(241, even_cuts(241, 5), latent_hw=(30, 52), max_shots=5)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_kernels_compile_for_tpu_with_the_masks_work_and_no_square_buffer(topology):
    from holocine_jax.compile import topology_devices

    film = wan_film()
    layout = film.broadcast_to_batch(1)
    length = layout.num_tokens
    assert length == 61 * 1560
    plan = make_plan(layout, mode="sparse", block_q=512, block_kv=256)
    mesh = Mesh(np.array(topology_devices(topology)).reshape(-1), ("heads",))
    chips = mesh.size
    spec = P(None, None, "heads", None)

    def attend(q, k, v):
        return jax.shard_map(lambda q, k, v: shot_attention_pallas_tpu(q, k, v, plan),
                             mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)

    def grads(q, k, v):
        return jax.grad(lambda *x: jnp.sum(attend(*x).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    x = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.bfloat16,
                             sharding=NamedSharding(mesh, spec))
    useful = film.num_allowed_pairs("sparse") * HEAD_DIM * HEADS // chips   # per chip, per unit
    for fn, units in ((attend, FWD_UNITS), (grads, FWD_UNITS + BWD_UNITS)):
        compiled = jax.jit(fn).lower(x, x, x).compile()
        flops = compiled.cost_analysis()["flops"]
        assert units * useful <= flops <= 1.15 * units * useful, (fn.__name__, flops / (units * useful))
        assert compiled.memory_analysis().temp_size_in_bytes < length * length
        for dims in re.findall(r"\b(?:bf16|f32|s32|pred|u32)\[([0-9,]+)\]", compiled.as_text()):
            big = [int(d) for d in dims.split(",") if int(d) >= length]
            assert len(big) < 2, f"a buffer [{dims}] spans the film twice"
