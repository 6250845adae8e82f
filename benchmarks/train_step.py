"""Training steps/s: our jitted train step vs the same step written for diffusers' model in torch.

    python benchmarks/train_step.py [--steps 5] [--cases tiny,mid] [--out results/train_step.json]

Same architecture (dit_forward.py's cases), same batch, float32 on this CPU. One step on each
side = draw timesteps and noise, x_t = (1 - s) x0 + s n, predict, flow-matching MSE against
n - x0, backward, global-norm clipping, AdamW update. The JAX side is `make_train_step` (with
its DiffSynth timestep weights and the donated TrainState); the torch side is the plain loop a
diffusers user writes. Steps alternate between the two so machine load hits both alike. Prints
a table and writes JSON with median step times and the torch/jax ratio (> 1: JAX faster).
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
from flax import nnx

from dit_forward import CASES, build
from holocine_jax.checkpoint import run_config
from holocine_jax.config import load_config
from holocine_jax.train.state import init_train_state, split_model
from holocine_jax.train.step import make_train_step

BATCH = {"tiny": 8, "mid": 1}


def jax_step(model, config, batch):
    graphdef, params, frozen, rest = split_model(model)
    state = init_train_state(config, params, frozen)
    step = jax.jit(make_train_step(config, graphdef, rest), donate_argnums=0)
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics["loss"])

    return run


def torch_step(ref, config, latents, text):
    tc = config.train
    opt = torch.optim.AdamW(ref.parameters(), lr=tc.learning_rate, betas=(tc.adam_b1, tc.adam_b2),
                            eps=tc.adam_eps, weight_decay=tc.weight_decay)
    x0 = torch.from_numpy(latents).permute(0, 4, 1, 2, 3).contiguous()
    text = torch.from_numpy(text)
    gen = torch.Generator().manual_seed(0)

    def run():
        b = x0.shape[0]
        sigma = torch.rand(b, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(b, 1, 1, 1, 1)
        pred = ref((1 - s) * x0 + s * noise, sigma * 1000, text, return_dict=False)[0]
        loss = ((pred - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), tc.grad_clip)
        opt.step()

    return run


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(case, steps):
    model, ref, (latents, _, text), tokens = build(case)
    b = BATCH[case]
    latents, text = np.repeat(latents, b, axis=0), np.repeat(text, b, axis=0)
    config = run_config(model, load_config("tiny"))   # the benchmark case's model section
    # the torch loop has no caption dropout: neither side drops
    config.train.update(warmup_steps=0, ema_decay=0.0, grad_accum=1, caption_dropout=0.0)
    js = jax_step(model, config, dict(latents=jnp.asarray(latents), text_states=jnp.asarray(text)))
    ts = torch_step(ref, config, latents, text)
    compile_s = timed(js)
    ts()
    times = {"jax": [], "torch": []}
    for _ in range(steps):
        times["jax"].append(timed(js))
        times["torch"].append(timed(ts))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": case, "batch": b, "tokens_per_film": tokens, "jax_compile_s": compile_s,
            "jax_step_s": med["jax"], "torch_step_s": med["torch"],
            "jax_steps_per_s": 1 / med["jax"], "torch_steps_per_s": 1 / med["torch"],
            "ratio_torch_over_jax": med["torch"] / med["jax"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cases", default="tiny,mid")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    rows = [run_case(c, args.steps) for c in args.cases.split(",")]
    print(f"{'case':6} {'batch':>5} {'tokens':>6} {'jax step/s':>10} {'torch step/s':>12} "
          f"{'ratio':>6} {'compile':>8}")
    for r in rows:
        print(f"{r['case']:6} {r['batch']:5d} {r['tokens_per_film']:6d} {r['jax_steps_per_s']:10.3f} "
              f"{r['torch_steps_per_s']:12.3f} {r['ratio_torch_over_jax']:6.2f} {r['jax_compile_s']:7.1f}s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
                   "torch": torch.__version__, "jax": jax.__version__, "steps": args.steps,
                   "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
