"""The Pallas TPU kernels do the film's work and no more, with the layout traced (a jit
argument, as in training and `sample`): the kernel bodies executed, counted from outside the
kernel by a host callback (interpret mode), equal heads x the active block pairs of the layout
for the forward, dQ and dK/dV kernels — the pairs computed here from the cuts alone (numpy,
not the block plan). And the step list fits the chunk whatever the film's length."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.test_xla import rel_err
from holocine_jax.attention import pallas_tpu
from holocine_jax.attention.plan import make_plan
from holocine_jax.attention.reference import shot_attention_reference
from holocine_jax.shots import ShotLayout

H, D, FRAMES, HW, MAX_SHOTS, BLOCK = 2, 8, 12, (2, 4), 5, 16
KERNELS = {"_fwd_kernel": "fwd", "_dq_kernel": "dq", "_dkv_kernel": "dkv"}


def active_pairs(latent_cuts, mode="sparse"):
    """Block pairs with at least one allowed token pair, from the cuts (official rule: a query
    sees its own shot and, in sparse mode, the first latent frame of every shot)."""
    bounds = [0, *latent_cuts, FRAMES]
    frame_shot = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    shot = np.repeat(frame_shot, HW[0] * HW[1])
    summary = np.repeat(np.isin(np.arange(FRAMES), bounds[:-1]), HW[0] * HW[1])
    allowed = shot[:, None] == shot[None]
    if mode == "sparse":
        allowed |= summary[None]
    n = -(-len(shot) // BLOCK)
    padded = np.zeros((n * BLOCK, n * BLOCK), bool)
    padded[:len(shot), :len(shot)] = allowed
    return int(padded.reshape(n, BLOCK, n, BLOCK).any(axis=(1, 3)).sum())


@pytest.fixture
def counted(monkeypatch):
    """Kernel bodies executed per kernel, counted by a host callback wrapped around each."""
    counts = collections.Counter()
    for name, kind in KERNELS.items():
        def counting(*refs, _kernel=getattr(pallas_tpu, name), _kind=kind, **kw):
            jax.debug.callback(lambda: counts.update([_kind]))
            return _kernel(*refs, **kw)
        monkeypatch.setattr(pallas_tpu, name, counting)
    return counts


@jax.jit
def out_and_grads(q, k, v, layout):
    plan = make_plan(layout, mode="sparse", block_q=BLOCK, block_kv=BLOCK)
    attend = lambda q, k, v: pallas_tpu.shot_attention_pallas_tpu(q, k, v, plan, interpret=True)
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(jnp.ones_like(out)))


def test_executed_bodies_equal_the_active_pairs_of_traced_layouts(counted):
    out_and_grads.clear_cache()      # trace with the counting kernels
    rng = np.random.default_rng(0)
    length = FRAMES * HW[0] * HW[1]
    q, k, v = (jnp.asarray(rng.standard_normal((1, length, H, D)), jnp.float32) for _ in range(3))
    seen = set()
    for _ in range(10):
        shots = int(rng.integers(1, MAX_SHOTS + 1))
        cuts = sorted(rng.choice(np.arange(1, FRAMES), shots - 1, replace=False).tolist())
        layout = ShotLayout.from_latent_cuts(FRAMES, cuts, latent_hw=HW, max_shots=MAX_SHOTS)
        counted.clear()
        got = jax.block_until_ready(out_and_grads(q, k, v, layout.broadcast_to_batch(1)))
        want = H * active_pairs(cuts)
        assert dict(counted) == dict(fwd=want, dq=want, dkv=want), (cuts, dict(counted), want)
        seen.add(want)
        ref = shot_attention_reference(q, k, v, layout.broadcast_to_batch(1))
        assert rel_err(got[0], ref) <= 2e-5
    assert out_and_grads._cache_size() == 1      # one program for every layout
    assert len(seen) >= 5                          # the counts really differ between films
    assert max(seen) < H * active_pairs([])        # ... and are below the dense grid


def test_chunks_cover_the_list_in_whole_rows(monkeypatch):
    """With a chunk smaller than the film's list (forced), the walk still visits every active
    pair once, in chunks of whole rows: same numbers as one chunk."""
    rng = np.random.default_rng(1)
    length = FRAMES * HW[0] * HW[1]
    q, k, v = (jnp.asarray(rng.standard_normal((2, length, H, D)), jnp.float32) for _ in range(3))
    layout = ShotLayout.stack([
        ShotLayout.from_latent_cuts(FRAMES, c, latent_hw=HW, max_shots=MAX_SHOTS)
        for c in ([3, 7], [1, 2, 5, 9])])
    out_and_grads.clear_cache()
    whole = out_and_grads(q, k, v, layout)
    monkeypatch.setattr(pallas_tpu, "CHUNK_STEPS", 7)   # < one film's 30-odd pairs, >= a row (6)
    out_and_grads.clear_cache()
    chunked = out_and_grads(q, k, v, layout)
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    ref = shot_attention_reference(q, k, v, layout)
    assert rel_err(chunked[0], ref) <= 2e-5
