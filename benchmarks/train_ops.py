"""Per-op forward+backward time, JAX (XLA:CPU) vs torch, at the `mid` train-step shape (issue 16).

    python benchmarks/train_ops.py [--repeats 5] [--out benchmarks/results/train_ops.json]

`train_step.py` and `dit_forward.py` time whole steps; this splits the DiT block into its ops at
L = 4096 tokens, dim 512, FFN 2048, 4 heads of 128, 512 text tokens, float32, and times
jax.grad / torch backward of sum(op(x, ...)^2) with respect to x for each: what bounds the step, and by how much.
Prints a table and writes JSON (median of `--repeats`, after two warm-up calls).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from holocine_jax.attention.xla import dense_attention_xla
from holocine_jax.model.rope import apply_rope

L, DIM, FFN, HEADS, TEXT = 4096, 512, 2048, 4, 512


def median_time(fn, repeats: int) -> float:
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ops():
    """name -> (jax fn, torch fn, numpy inputs)."""
    r = np.random.default_rng(0)
    x = r.standard_normal((1, L, DIM)).astype(np.float32)
    heads = x.reshape(1, L, HEADS, DIM // HEADS)
    w = (r.standard_normal((DIM, DIM)) * 0.02).astype(np.float32)
    w1 = (r.standard_normal((DIM, FFN)) * 0.02).astype(np.float32)
    w2 = (r.standard_normal((FFN, DIM)) * 0.02).astype(np.float32)
    text = r.standard_normal((1, TEXT, HEADS, DIM // HEADS)).astype(np.float32)
    angles = r.standard_normal((L, DIM // HEADS // 2)).astype(np.float32)
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    def torch_rope(q, c, s):
        pairs = q.unflatten(-1, (-1, 2))
        x1, x2, c, s = pairs[..., 0], pairs[..., 1], c[None, :, None], s[None, :, None]
        return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)

    def rms(x, rsqrt, mean):
        return x * rsqrt(mean(x * x) + 1e-6)

    return {
        "linear 512x512": (lambda a, b: a @ b, lambda a, b: a @ b, (x, w)),
        "ffn 512-2048-512": (lambda a, b, c: jax.nn.gelu(a @ b, approximate=True) @ c,
                             lambda a, b, c: torch.nn.functional.gelu(a @ b, approximate="tanh") @ c,
                             (x, w1, w2)),
        "self-attention 4096": (dense_attention_xla, sdpa, (heads, heads, heads)),
        "jax.nn.dot_product_attention 4096": (jax.nn.dot_product_attention, sdpa,
                                              (heads, heads, heads)),
        "cross-attention 4096x512": (lambda q, k: dense_attention_xla(q, k, k),
                                     lambda q, k: sdpa(q, k, k), (heads, text)),
        "rms norm 512": (lambda a: rms(a, jax.lax.rsqrt, lambda y: jnp.mean(y, -1, keepdims=True)),
                         lambda a: rms(a, torch.rsqrt, lambda y: y.mean(-1, keepdim=True)), (x,)),
        "rope": (apply_rope, torch_rope, (heads, angles, angles)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/train_ops.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    rows = []
    print(f"{'op (fwd+bwd)':36s} {'jax ms':>8s} {'torch ms':>8s} {'jax/torch':>9s}")
    for name, (fj, ft, inputs) in ops().items():
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(fj(*a) ** 2), argnums=0))
        ja = [jnp.asarray(a) for a in inputs]
        tj = median_time(lambda: jax.block_until_ready(grad(*ja)), args.repeats)
        ta = [torch.from_numpy(a) for a in inputs]
        ta[0].requires_grad_()   # both sides: the gradient of the first input only

        def backward():
            ta[0].grad = None
            (ft(*ta) ** 2).sum().backward()

        tt = median_time(backward, args.repeats)
        rows.append(dict(op=name, jax_s=tj, torch_s=tt, ratio_jax_over_torch=tj / tt))
        print(f"{name:36s} {tj * 1e3:8.1f} {tt * 1e3:8.1f} {tj / tt:9.2f}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(shape=dict(tokens=L, dim=DIM, ffn=FFN, heads=HEADS, text=TEXT),
                       torch=torch.__version__, jax=jax.__version__, repeats=args.repeats,
                       rows=rows), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
