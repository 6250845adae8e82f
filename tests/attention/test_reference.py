"""Shot attention against the official HoloCine constructions, written out in torch (float64).

Official sparse: per shot, keys = own shot tokens ++ first-frame tokens of all shots (explicit
concatenation, no masks). Official window cross-attention: additive -1e4 outside the windows.
"""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from holocine_jax.attention import cross_attention
from holocine_jax.attention import shot_attention as shot_attention_eager
from holocine_jax.attention.reference import cross_attention_reference
from holocine_jax.shots import ShotLayout

F, HW, K, H, D = 12, (2, 2), 5, 2, 8
T = HW[0] * HW[1]
L = F * T
shot_attention = jax.jit(shot_attention_eager, static_argnames=(
    "mode", "impl", "summary_self_weight", "interpret", "block_q", "block_kv"))


def random_cuts(rng, num_frames=F, max_shots=K):
    n = int(rng.integers(1, max_shots + 1))
    return sorted(rng.choice(np.arange(1, num_frames), n - 1, replace=False).tolist())


def official_sparse(q, k, v, cuts, per_g):
    """attention_per_batch_with_shots for one film: q, k, v [L, H, D] torch, cuts [0, ..., L]."""
    bounds = list(zip(cuts[:-1], cuts[1:]))
    k_glob = torch.cat([k[a:a + min(per_g, b - a)] for a, b in bounds])
    v_glob = torch.cat([v[a:a + min(per_g, b - a)] for a, b in bounds])
    outs = []
    for a, b in bounds:
        keys, vals = torch.cat([k[a:b], k_glob]), torch.cat([v[a:b], v_glob])
        outs.append(dense(q[a:b], keys, vals))
    return torch.cat(outs)


def per_shot(q, k, v, cuts):
    return torch.cat([dense(q[a:b], k[a:b], v[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])


def dense(q, k, v, bias=None):
    """Plain softmax attention, [Lq, H, D] x [Lk, H, D] -> [Lq, H, D]."""
    logits = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias
    return torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1), v)


def rel_err(ours, want):
    ours, want = np.asarray(ours, np.float64), np.asarray(want, np.float64)
    return np.abs(ours - want).max() / np.abs(want).max()


@pytest.fixture(scope="module")
def films():
    rng = np.random.default_rng(42)
    cuts = [random_cuts(rng) for _ in range(8)] + [[], list(range(1, K))]
    layout = ShotLayout.stack([ShotLayout.from_latent_cuts(F, c, latent_hw=HW, max_shots=K)
                               for c in cuts])
    qkv = [rng.standard_normal((len(cuts), L, H, D)).astype(np.float32) for _ in range(3)]
    token_cuts = [[0] + [c * T for c in cs] + [L] for cs in cuts]
    return layout, qkv, token_cuts


def torch_per_film(fn, qkv, token_cuts, **kw):
    q, k, v = (torch.from_numpy(x).double() for x in qkv)
    return np.stack([fn(q[b], k[b], v[b], token_cuts[b], **kw).numpy()
                     for b in range(len(token_cuts))])


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_sparse_matches_official_concatenation(films, impl):
    layout, qkv, token_cuts = films
    want = torch_per_film(official_sparse, qkv, token_cuts, per_g=T)
    ours = shot_attention(*map(jnp.asarray, qkv), layout, mode="sparse", impl=impl,
                          summary_self_weight=2.0, block_q=16, block_kv=8)
    assert rel_err(ours, want) <= 1e-5
    clean = shot_attention(*map(jnp.asarray, qkv), layout, mode="sparse", impl=impl,
                           summary_self_weight=1.0, block_q=16, block_kv=8)
    assert rel_err(clean, want) > 1e-3  # the duplicated own first frame matters


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_independent_is_per_shot_attention(films, impl):
    layout, qkv, token_cuts = films
    want = torch_per_film(per_shot, qkv, token_cuts)
    ours = shot_attention(*map(jnp.asarray, qkv), layout, mode="independent", impl=impl,
                          block_q=16, block_kv=8)
    assert rel_err(ours, want) <= 1e-5


@pytest.mark.parametrize("impl", ["reference", "xla", "auto"])
def test_full_is_plain_attention(films, impl):
    layout, qkv, token_cuts = films
    want = torch_per_film(lambda q, k, v, cuts: dense(q, k, v), qkv, token_cuts)
    ours = shot_attention(*map(jnp.asarray, qkv), layout, mode="full", impl=impl,
                          block_q=16, block_kv=8)
    assert rel_err(ours, want) <= 1e-5
    plain = shot_attention(*map(jnp.asarray, qkv))  # layout=None: Wan
    assert rel_err(plain, want) <= 1e-5


def test_window_cross_attention_matches_official_bias():
    rng = np.random.default_rng(3)
    text_len, cuts = 24, [3, 7]
    glob, shots = (0, 5), [(5, 9), (10, 14), (14, 19)]  # official positions [first, last + 1)
    layout = ShotLayout.from_latent_cuts(
        F, cuts, latent_hw=HW, max_shots=K, text_pad_start=max(e for _, e in shots) + 1,
        text_windows=[[a, b + 1] for a, b in [glob] + shots])  # one past the end
    q = rng.standard_normal((2, L, H, D)).astype(np.float32)
    k, v = (rng.standard_normal((2, text_len, H, D)).astype(np.float32) for _ in range(2))
    # model_fn_wan_video's mask, written out: global/shot slices [s0:s1+1], padding after.
    allow = np.zeros((L, text_len), bool)
    frame_shot = np.searchsorted([0] + cuts, np.arange(F), side="right") - 1
    for tok in range(L):
        s0, s1 = shots[frame_shot[tok // T]]
        allow[tok, glob[0]:glob[1] + 1] = allow[tok, s0:s1 + 1] = True
        allow[tok, max([glob[1]] + [e for _, e in shots]) + 1:] = True
    bias = torch.from_numpy(np.where(allow, 0.0, -1e4))
    tq, tk, tv = (torch.from_numpy(x).double() for x in (q, k, v))
    want = np.stack([dense(tq[b], tk[b], tv[b], bias).numpy() for b in range(2)])
    assert rel_err(cross_attention(q, k, v, layout), want) <= 1e-5
    assert rel_err(cross_attention_reference(q, k, v, ShotLayout.stack([layout] * 2)), want) <= 1e-5
    no_windows = np.stack([dense(tq[b], tk[b], tv[b]).numpy() for b in range(2)])
    assert rel_err(cross_attention(q, k, v, layout.without_text_windows()), no_windows) <= 1e-5
    assert rel_err(cross_attention(q, k, v), no_windows) <= 1e-5


def test_dispatch_errors(films):
    layout, qkv, _ = films
    q = jnp.asarray(qkv[0])
    with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU .* interpret=True"):
        shot_attention_eager(q, q, q, layout, impl="pallas")
    with pytest.raises(ValueError, match="context_strategy 'ring'"):
        shot_attention_eager(q, q, q, layout, context_strategy="ring")
    with pytest.raises(ValueError, match="mode 'causal'"):
        shot_attention_eager(q, q, q, layout, mode="causal")
    with pytest.raises(ValueError, match=f"sequence length {L - T} != layout tokens {L}"):
        shot_attention_eager(q[:, T:], q[:, T:], q[:, T:], layout)
