"""The Pallas TPU kernels compile ahead of time for TPU v5e and v5p from this CPU host (libtpu)
at the Wan shape — 40 heads of 128 split over the chips, a 5-shot film of 61 latent frames x
1560 tokens and a 60 s 13-shot film of 241 — with the layout traced (a jit argument, as in
training), bf16, at the default block sizes. Read back from the compiled program (the Mosaic
modules in its HLO, not the kernels' own estimates): forward, dQ and dK/dV kernels whose step
grid is dynamic (sized from the layout at run time, so the work follows the film: counted in
test_pallas_work.py), SMEM within one chunk of steps, and no [L, L] buffer."""
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from holocine_jax.attention.pallas_tpu import CHUNK_STEPS, shot_attention_pallas_tpu
from holocine_jax.attention.plan import make_plan
from holocine_jax.attention.spec import AttentionSpec
from holocine_jax.parallel.hlo import mosaic_kernels
from holocine_jax.shots import ShotLayout, even_cuts

pytestmark = [pytest.mark.tpu_aot,
              pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="libtpu (the `tpu` extra) is not installed")]

HEADS, HEAD_DIM = 40, 128
SMEM_BYTES = 1 << 20       # v5e / v5p


def compiled_kernels(topology, frames, shots):
    from holocine_jax.compile import topology_devices

    film = ShotLayout.from_cuts(frames, even_cuts(frames, shots), latent_hw=(30, 52), max_shots=13)
    layout = film.broadcast_to_batch(1)
    length = layout.num_tokens
    spec = AttentionSpec()
    mesh = Mesh(np.array(topology_devices(topology)).reshape(-1), ("heads",))
    heads = P(None, None, "heads", None)

    def local(q, k, v, layout):     # per chip: its heads, the whole film
        plan = make_plan(layout, mode="sparse", block_q=spec.block_q, block_kv=spec.block_kv)
        return shot_attention_pallas_tpu(q, k, v, plan)

    def grads(q, k, v, layout):
        attend = jax.shard_map(local, mesh=mesh, in_specs=(heads,) * 3 + (P(),), out_specs=heads,
                               check_vma=False)
        loss = lambda q, k, v: jnp.sum(attend(q, k, v, layout).astype(jnp.float32))
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    x = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.bfloat16,
                             sharding=NamedSharding(mesh, heads))
    traced = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                         sharding=NamedSharding(mesh, P())), layout)
    compiled = jax.jit(grads).lower(x, x, x, traced).compile()
    return compiled, mosaic_kernels(compiled.as_text()), length, mesh.size


@pytest.mark.parametrize("topology, frames, shots", [
    ("v5p:2x2x1", 241, 5),
    pytest.param("v5e:2x2", 241, 5, marks=pytest.mark.slow),
    pytest.param("v5p:2x2x1", 961, 13, marks=pytest.mark.slow)])
def test_kernels_compile_with_traced_layouts_and_a_grid_that_follows_the_film(topology, frames, shots):
    compiled, kernels, length, chips = compiled_kernels(topology, frames, shots)
    assert sorted(k["name"] for k in kernels) == ["shot_attention_dkv", "shot_attention_dq",
                                                  "shot_attention_fwd"]
    for k in kernels:
        assert k["grid"] == (HEADS // chips, None), k     # heads x a dynamic step count
        assert 4 * CHUNK_STEPS <= k["smem_bytes"] <= 4 * CHUNK_STEPS + 4096 < SMEM_BYTES, k
    assert compiled.memory_analysis().temp_size_in_bytes < length * length
    for dims in re.findall(r"\b(?:bf16|f32|s32|pred|u32)\[([0-9,]+)\]", compiled.as_text()):
        big = [int(d) for d in dims.split(",") if int(d) >= length]
        assert len(big) < 2, f"a buffer [{dims}] spans the film twice"
