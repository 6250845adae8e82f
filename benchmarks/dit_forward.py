"""Jitted WanDiT forward and forward+backward vs diffusers' WanTransformer3DModel (torch, CPU).

    python benchmarks/dit_forward.py [--repeats 3] [--cases tiny,mid] [--out results/dit_forward.json]

Both run the same architecture on the same inputs in float32 on this machine's CPU; repeats
alternate between the two so that load from other processes hits both alike. Prints a table and
writes JSON with median times and torch/jax ratios (> 1: JAX faster).
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
from diffusers import WanTransformer3DModel
from flax import nnx

from holocine_jax.config import load_config
from holocine_jax.model import WanDiT

# name: (model overrides, latent [F, H, W], text length)
CASES = {
    "tiny": (dict(), (9, 8, 8), 64),                                          # 144 tokens
    "mid": (dict(dim=512, ffn_dim=2048, num_heads=4, num_layers=8, text_dim=512), (16, 32, 32), 512),  # 4096
}


def build(case):
    fields, fhw, text_len = CASES[case]
    config = load_config("tiny", ["--config.model.dtype=float32"])
    config.model.update(fields)
    m = config.model
    model = WanDiT.from_config(config, rngs=nnx.Rngs(0))
    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=tuple(m.patch_size), num_attention_heads=m.num_heads, attention_head_dim=m.dim // m.num_heads,
        in_channels=m.in_channels, out_channels=m.out_channels, text_dim=m.text_dim, freq_dim=m.freq_dim,
        ffn_dim=m.ffn_dim, num_layers=m.num_layers, cross_attn_norm=m.cross_attn_norm, eps=m.eps)
    r = np.random.default_rng(0)
    latents = r.standard_normal((1, *fhw, m.in_channels)).astype(np.float32)
    timesteps = np.array([500.0], np.float32)
    text = r.standard_normal((1, text_len, m.text_dim)).astype(np.float32)
    tokens = fhw[0] * fhw[1] * fhw[2] // 4
    return model, ref, (latents, timesteps, text), tokens


def jax_fns(model, inputs):
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, x, t, s: nnx.merge(graphdef, p)(x, t, s))
    grad = jax.jit(jax.grad(lambda p, x, t, s: jnp.mean(nnx.merge(graphdef, p)(x, t, s) ** 2)))
    args = (params, *map(jnp.asarray, inputs))
    return (lambda: jax.block_until_ready(fwd(*args))), (lambda: jax.block_until_ready(grad(*args)))


def torch_fns(ref, inputs):
    latents, timesteps, text = (torch.from_numpy(a) for a in inputs)
    latents = latents.permute(0, 4, 1, 2, 3).contiguous()

    def fwd():
        with torch.no_grad():
            ref(latents, timesteps, text, return_dict=False)

    def fwd_bwd():
        ref.zero_grad(set_to_none=True)
        (ref(latents, timesteps, text, return_dict=False)[0] ** 2).mean().backward()

    return fwd, fwd_bwd


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(case, repeats):
    model, ref, inputs, tokens = build(case)
    jf, jb = jax_fns(model, inputs)
    tf, tb = torch_fns(ref, inputs)
    compile_s = timed(jf) + timed(jb)  # first calls compile
    tf(), tb()                          # torch warm-up
    times = {k: [] for k in ("jax_fwd", "torch_fwd", "jax_fwd_bwd", "torch_fwd_bwd")}
    for _ in range(repeats):
        times["jax_fwd"].append(timed(jf))
        times["torch_fwd"].append(timed(tf))
        times["jax_fwd_bwd"].append(timed(jb))
        times["torch_fwd_bwd"].append(timed(tb))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": case, "tokens": tokens, "jax_compile_s": compile_s, **{f"{k}_s": v for k, v in med.items()},
            "fwd_ratio_torch_over_jax": med["torch_fwd"] / med["jax_fwd"],
            "fwd_bwd_ratio_torch_over_jax": med["torch_fwd_bwd"] / med["jax_fwd_bwd"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="tiny,mid")
    parser.add_argument("--out", default="benchmarks/results/dit_forward.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    rows = [run_case(c, args.repeats) for c in args.cases.split(",")]
    print(f"{'case':6} {'tokens':>6} {'jax fwd':>9} {'torch fwd':>9} {'ratio':>6} "
          f"{'jax f+b':>9} {'torch f+b':>9} {'ratio':>6} {'compile':>8}")
    for r in rows:
        print(f"{r['case']:6} {r['tokens']:6d} {r['jax_fwd_s'] * 1e3:8.1f}ms {r['torch_fwd_s'] * 1e3:8.1f}ms "
              f"{r['fwd_ratio_torch_over_jax']:6.2f} {r['jax_fwd_bwd_s'] * 1e3:8.1f}ms "
              f"{r['torch_fwd_bwd_s'] * 1e3:8.1f}ms {r['fwd_bwd_ratio_torch_over_jax']:6.2f} {r['jax_compile_s']:7.1f}s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "torch": torch.__version__,
                   "jax": jax.__version__, "repeats": args.repeats, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
