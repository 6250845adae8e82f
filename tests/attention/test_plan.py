"""Block plans against dense masks computed here in numpy from the cuts."""
import functools

import jax
import numpy as np
import pytest

from holocine_jax.attention.plan import make_plan
from holocine_jax.shots import ShotLayout

F, HW, K = 13, (1, 3), 8
T = HW[0] * HW[1]
L = F * T  # 39: no block size below divides it evenly except 3 and 13


def random_layouts(rng, n, summary_frames=1):
    cuts = [[], list(range(summary_frames, F - summary_frames + 1, summary_frames))[:K - 1]]
    while len(cuts) < n:
        shots = int(rng.integers(1, K + 1))
        c = sorted(rng.choice(np.arange(1, F), shots - 1, replace=False).tolist())
        if min(np.diff([0] + c + [F])) >= summary_frames:
            cuts.append(c)
    return cuts, ShotLayout.stack([
        ShotLayout.from_latent_cuts(F, c, latent_hw=HW, max_shots=K, summary_frames=summary_frames)
        for c in cuts])


def dense_allowed(cuts, mode, summary_frames=1):
    """[L, L] allowed pairs of one film, from its latent cuts."""
    starts = np.array([0] + list(cuts))
    frame_shot = np.searchsorted(starts, np.arange(F), side="right") - 1
    shot = np.repeat(frame_shot, T)
    summary = np.repeat(np.arange(F) - starts[frame_shot] < summary_frames, T)
    same = shot[:, None] == shot[None, :]
    return {"full": np.ones((L, L), bool), "independent": same,
            "sparse": same | summary[None, :]}[mode]


@functools.partial(jax.jit, static_argnames=("mode", "block_q", "block_kv"))
def plan_of(layout, mode, block_q, block_kv):
    return make_plan(layout, mode=mode, block_q=block_q, block_kv=block_kv)


@pytest.mark.parametrize("mode", ["sparse", "independent", "full"])
@pytest.mark.parametrize("block_q, block_kv", [(4, 4), (8, 5), (6, 16), (39, 39), (64, 7)])
def test_plan_covers_allowed_pairs_exactly_once(mode, block_q, block_kv):
    rng = np.random.default_rng(block_q * 100 + block_kv)
    summary_frames = 2 if block_q == 8 else 1
    cuts, layout = random_layouts(rng, 24, summary_frames)
    plan = jax.tree.map(np.asarray, plan_of(layout, mode, block_q, block_kv))
    nq, nk = -(-L // block_q), -(-L // block_kv)
    assert plan.kv_index.shape == (len(cuts), nq, plan.row_bound) and plan.row_bound == nk
    assert plan.q_index.shape == (len(cuts), nk, plan.col_bound) and plan.col_bound == nq
    for b, c in enumerate(cuts):
        allowed = np.zeros((nq * block_q, nk * block_kv), bool)
        allowed[:L, :L] = dense_allowed(c, mode, summary_frames)
        blocks = allowed.reshape(nq, block_q, nk, block_kv).transpose(0, 2, 1, 3)
        inside = np.zeros_like(allowed)
        inside[:L, :L] = True
        inside = inside.reshape(nq, block_q, nk, block_kv).transpose(0, 2, 1, 3).all((2, 3))
        covered = np.zeros((nq, nk), int)
        full = np.zeros((nq, nk), bool)
        for i in range(nq):
            count = plan.kv_count[b, i]
            assert count <= plan.row_bound
            for j in range(count):
                covered[i, plan.kv_index[b, i, j]] += 1
                full[i, plan.kv_index[b, i, j]] = plan.kv_full[b, i, j]
        # Every allowed pair exactly once; no block listed without an allowed pair (exact plan).
        assert (covered <= 1).all()
        np.testing.assert_array_equal(covered == 1, blocks.any((2, 3)))
        # Full blocks: every pair allowed (and only those: the flag is exact).
        np.testing.assert_array_equal(full, blocks.all((2, 3)) & inside)
        # The transposed lists hold the same pairs with the same flags.
        covered_t = np.zeros((nq, nk), int)
        for c_ in range(nk):
            assert plan.q_count[b, c_] <= plan.col_bound
            for j in range(plan.q_count[b, c_]):
                i = plan.q_index[b, c_, j]
                covered_t[i, c_] += 1
                assert plan.q_full[b, c_, j] == full[i, c_]
        np.testing.assert_array_equal(covered_t, covered)
        assert plan.num_active[b] == covered.sum()


def test_plan_is_sparse_for_many_shots():
    layout = ShotLayout.stack([ShotLayout.from_latent_cuts(64, range(8, 64, 8), latent_hw=(4, 4),
                                                           max_shots=8)])
    counts = {m: int(plan_of(layout, m, 16, 16).num_active[0]) for m in ("full", "independent",
                                                                          "sparse")}
    # 64 x 64 blocks; 8 shots of 8x8 blocks; each first frame is one block.
    assert counts == {"full": 64 * 64, "independent": 8 * 64, "sparse": 8 * 64 + 64 * 7}
