"""The blocked dense CPU executor (`xla.dense_attention_xla`) against torch's
`scaled_dot_product_attention` (an independent implementation): outputs and q/k/v gradients,
with lengths that leave padded last chunks, Lq != Lk, several chunk pairs and bfloat16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from holocine_jax.attention import shot_attention
from holocine_jax.attention.xla import dense_attention_xla


def torch_out_and_grads(q, k, v, ct):
    tq, tk, tv = (torch.tensor(np.asarray(x, np.float64)).permute(0, 2, 1, 3).requires_grad_()
                  for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    (out * torch.tensor(np.asarray(ct, np.float64)).permute(0, 2, 1, 3)).sum().backward()
    return [x.detach().permute(0, 2, 1, 3).numpy() for x in (out, tq.grad, tk.grad, tv.grad)]


def ours_out_and_grads(q, k, v, ct, block_q, block_kv):
    def loss(q, k, v):
        out = dense_attention_xla(q, k, v, block_q=block_q, block_kv=block_kv)
        return jnp.sum(out.astype(jnp.float32) * ct), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float64) for x in (out, *grads)]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("lq,lk,block_q,block_kv", [
    (100, 100, 32, 16),    # padded last q and kv chunks (100 = 3 x 32 + 4 = 6 x 16 + 4)
    (64, 200, 64, 64),     # Lq != Lk, one q chunk, padded kv
    (37, 5, 512, 512),     # blocks clipped to the lengths: one chunk pair
])
def test_dense_executor_matches_torch_sdpa(lq, lk, block_q, block_kv):
    rng = np.random.default_rng(lq + lk)
    b, h, d = 2, 3, 16
    q, ct = (jnp.asarray(rng.standard_normal((b, lq, h, d)) * 2, jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, lk, h, d)) * 2, jnp.float32) for _ in range(2))
    ours = ours_out_and_grads(q, k, v, ct, block_q, block_kv)
    want = torch_out_and_grads(q, k, v, ct)
    for name, a, w in zip(("out", "dq", "dk", "dv"), ours, want):
        assert rel_err(a, w) < 2e-5, (name, rel_err(a, w))


def test_dense_executor_bfloat16_close_to_float64():
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((1, 96, 2, 32)), jnp.float32) for _ in range(4))
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ours = ours_out_and_grads(*bf, ct, 32, 32)
    want = torch_out_and_grads(*(np.asarray(x.astype(jnp.float32)) for x in bf), ct)
    assert jax.eval_shape(lambda: dense_attention_xla(*bf)).dtype == jnp.bfloat16
    for name, a, w in zip(("out", "dq", "dk", "dv"), ours, want):
        assert rel_err(a, w) < 2e-2, (name, rel_err(a, w))


def test_plain_and_full_attention_run_the_dense_executor_on_cpu():
    """layout=None and mode='full' (impl auto) lower to the chunked loop, not an [L, L] buffer."""
    from holocine_jax.shots import ShotLayout
    length = 4 * 1024
    layout = ShotLayout.from_latent_cuts(4, [2], latent_hw=(32, 32), max_shots=2)
    x = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
    for fn in (lambda q, k, v: shot_attention(q, k, v),
               lambda q, k, v: shot_attention(q, k, v, layout, mode="full")):
        hlo = jax.jit(fn).lower(x, x, x).as_text()
        assert "while" in hlo and f"{length}x{length}" not in hlo
