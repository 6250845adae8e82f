"""Context-parallel shot attention on 8 fake CPU devices equals the single-device reference
(outputs and q/k/v gradients, f32 rel err <= 1e-5) for random layouts whose shots straddle the
device slices; collectives never gather the whole sequence; bad splits fail before tracing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.test_xla import random_layouts
from holocine_jax.attention import AttentionSpec, shot_attention
from holocine_jax.attention.context import check_halo, context_attention, required_halo
from holocine_jax.attention.reference import shot_attention_reference
from holocine_jax.config import load_config
from holocine_jax.parallel import make_mesh
from holocine_jax.parallel.hlo import collective_bytes
from holocine_jax.shots import ShotLayout

B, F, HW, H, D = 2, 6, (4, 4), 8, 8     # L = 96: 12 tokens per device at context 8 (3/4 frame)
L = F * HW[0] * HW[1]
MESHES = [(1, 1, 2, 1), (1, 1, 8, 1), (1, 2, 4, 1), (2, 1, 2, 2)]
RULES = load_config("tiny").mesh.rules


def context_shot_attention(q, k, v, layout, *, mesh, strategy="ulysses", halo=None, **spec):
    """The context path with a resolved strategy and the configs' rule table."""
    return context_attention(q, k, v, layout, AttentionSpec(**spec), mesh=mesh, rules=RULES,
                             strategy=strategy, halo=halo)


def mesh_of(sizes):
    return make_mesh(dict(zip(("data", "fsdp", "context", "tensor"), sizes)),
                     devices=jax.devices()[:int(np.prod(sizes))])


def inputs(seed):
    rng = np.random.default_rng(seed)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32) for _ in range(4))
    layout = ShotLayout.stack(random_layouts(rng, B, frames=F, hw=HW, max_shots=4))
    return q, k, v, ct, layout


def out_and_grads(attend, q, k, v, ct):
    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out * ct), out
    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return (out,) + grads


def rel_err(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


CASES = [pytest.param(sizes, mode, strategy, id=f"{'x'.join(map(str, sizes))}-{mode}-{strategy}",
                      marks=() if mode == "sparse" or sizes == (2, 1, 2, 2) else pytest.mark.slow)
         for sizes in MESHES for mode in ("sparse", "full", "independent")
         for strategy in ("ulysses", "shot_aware")]


@pytest.mark.parametrize("sizes, mode, strategy", CASES)
def test_context_attention_equals_reference(sizes, mode, strategy):
    q, k, v, ct, layout = inputs(seed=sum(sizes) + len(mode))
    want = out_and_grads(lambda q, k, v: shot_attention_reference(q, k, v, layout, mode=mode), q, k, v, ct)
    mesh = mesh_of(sizes)

    @jax.jit
    def sharded(q, k, v, ct, layout):
        attend = functools.partial(shot_attention, layout=layout, mode=mode, impl="xla",
                                   block_q=16, block_kv=16, context_strategy=strategy, rules=RULES)
        return out_and_grads(attend, q, k, v, ct)

    with jax.set_mesh(mesh):
        got = sharded(q, k, v, ct, layout)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(g, w) <= 1e-5, (name, rel_err(g, w))


def test_ulysses_moves_heads_not_the_sequence():
    """Per device, ulysses' all-to-alls carry q, k, v and the output once each ([b, L/C, H, D]
    slices; b = B here); nothing all-gathers K/V over the whole film."""
    q, k, v, _, layout = inputs(seed=0)
    mesh = mesh_of((1, 1, 8, 1))
    attend = jax.jit(lambda q, k, v, l: context_shot_attention(q, k, v, l, mesh=mesh, impl="xla",
                                                                block_q=16, block_kv=16))
    with jax.set_mesh(mesh):
        moved = collective_bytes(attend.lower(q, k, v, layout).compile().as_text())
    slice_bytes = B * (L // 8) * H * D * 4
    assert moved.get("all-to-all") == 4 * slice_bytes, moved
    assert moved.get("all-gather", 0) < B * L * H * D * 4 // 8, moved


def test_bad_splits_fail_before_tracing():
    q, k, v, _, layout = inputs(seed=1)
    mesh = mesh_of((1, 1, 8, 1))
    with pytest.raises(ValueError, match=r"ulysses needs heads divisible by tensor x context = 1 x 8; "
                                         r"the model has 4 heads"):
        context_shot_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], layout, mesh=mesh)
    odd = ShotLayout.stack([ShotLayout.from_latent_cuts(5, [2], latent_hw=(3, 3), max_shots=4)] * B)
    x = jnp.zeros((B, 45, H, D))
    with pytest.raises(ValueError, match="45 tokens do not split evenly over context=8"):
        context_shot_attention(x, x, x, odd, mesh=mesh)
    with pytest.raises(ValueError, match="context strategy 'ring'"):
        context_shot_attention(q, k, v, layout, mesh=mesh, strategy="ring")


@pytest.mark.parametrize("context, frames, cuts", [(2, 32, [3, 7, 11, 15, 19, 23, 27]),
                                                   (4, 32, [6, 14, 22])])
def test_shot_aware_moves_near_the_minimum_and_less_than_ulysses(context, frames, cuts):
    """HLO collective bytes per device: shot_aware with the layout's halos <= 1.2 x the analytic
    minimum (every shot's summary tokens + the worst device's boundary halos, K and V), strictly
    below ulysses (q, k, v, out slices), and no op gathers the whole sequence."""
    hw, shots = (4, 4), len(cuts) + 1
    layout = ShotLayout.stack([ShotLayout.from_latent_cuts(frames, cuts, latent_hw=hw,
                                                           max_shots=shots)] * B)
    length, t = layout.num_tokens, hw[0] * hw[1]
    x = jnp.zeros((B, length, H, D), jnp.float32)
    mesh = mesh_of((1, 1, context, 1))
    left, right = required_halo(layout, context)
    n = length // context
    shot = np.asarray(layout.token_shot_id())[0]
    worst = max(j * n - np.searchsorted(shot, shot[j * n]) +
                np.searchsorted(shot, shot[(j + 1) * n - 1], "right") - (j + 1) * n
                for j in range(context))
    token_bytes = B * H * D * 4
    minimum = 2 * (shots * t + worst) * token_bytes
    moved = {}
    for strategy, halo in (("shot_aware", (left, right)), ("ulysses", None)):
        f = jax.jit(lambda q, k, v, l: context_shot_attention(q, k, v, l, mesh=mesh, strategy=strategy,
                                                               impl="xla", block_q=16, block_kv=16, halo=halo))
        with jax.set_mesh(mesh):
            moved[strategy] = collective_bytes(f.lower(x, x, x, layout).compile().as_text())
        assert moved[strategy].get("all-gather", 0) < length * token_bytes // context, moved
    ours, theirs = sum(moved["shot_aware"].values()), sum(moved["ulysses"].values())
    assert ours <= 1.2 * minimum, (ours, minimum, moved)
    assert ours < theirs, moved
    # `auto` with the whole film as halo (the default) picks ulysses, which moves less
    f = jax.jit(lambda q, k, v, l: shot_attention(q, k, v, l, impl="xla", block_q=16, block_kv=16,
                                                   context_strategy="auto", rules=RULES))
    with jax.set_mesh(mesh):
        assert collective_bytes(f.lower(x, x, x, layout).compile().as_text()) == moved["ulysses"]


def test_required_halo_is_checked_per_batch():
    layout = ShotLayout.stack([ShotLayout.from_latent_cuts(32, [6, 14, 22], latent_hw=(4, 4), max_shots=4)])
    assert required_halo(layout, 4) == (2 * 16, 8 * 16)
    check_halo(layout, 4, 8)
    check_halo(layout, 4, -1)
    with pytest.raises(ValueError, match="overhangs its context slice by 128 tokens .8 latent frames. "
                                         "but config.attention.context_halo_frames=4"):
        check_halo(layout, 4, 4)


def test_the_rule_table_places_the_sequence():
    """The shard_map specs come from `config.mesh.rules`: a table that splits the sequence over
    the `fsdp` axis (and the batch over `data` only) runs context parallelism there — the same
    numbers as the reference and all-to-alls in the program — and without rules a mesh that
    splits the sequence is refused."""
    q, k, v, ct, layout = inputs(seed=4)
    rules = (("batch", "data"), ("sequence", "fsdp"), ("heads", "tensor"))
    mesh = mesh_of((1, 8, 1, 1))
    attend = jax.jit(lambda q, k, v, l: shot_attention(q, k, v, l, impl="xla", block_q=16,
                                                        block_kv=16, rules=rules))
    want = shot_attention_reference(q, k, v, layout, mode="sparse")
    with jax.set_mesh(mesh):
        assert rel_err(attend(q, k, v, layout), want) <= 1e-5
        moved = collective_bytes(attend.lower(q, k, v, layout).compile().as_text())
    assert moved.get("all-to-all", 0) == 4 * B * (L // 8) * H * D * 4, moved
    with jax.set_mesh(mesh_of((1, 1, 8, 1))), pytest.raises(ValueError, match="pass rules="):
        shot_attention(q, k, v, layout)
