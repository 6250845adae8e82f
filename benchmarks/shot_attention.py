"""Sparse shot attention (blocked XLA executor, Pallas kernels) vs dense attention.

    python benchmarks/shot_attention.py [--frames 64 --hw 16 --heads 1 --head-dim 64]
        [--shots 2,4,8] [--block 256] [--gpu-block 128] [--repeats 2] [--sections xla,kernels]
        [--tpu-films 241:5,961:13] [--tpu-blocks 128x128,256x256,...]
        [--out benchmarks/results/shot_attention.json]

Section `kernels`: on a GPU (or TPU), the Pallas kernel's fwd and fwd+bwd time vs dense
`jax.nn.dot_product_attention` (cuDNN on GPU) in bf16, and TFLOP/s on the useful FLOPs
(allowed pairs x 4 D per head forward, x 3.5 for fwd+bwd as FlashAttention counts; dense
cuDNN's TFLOP/s on its L^2 pairs beside it; GPU blocks `--gpu-block`); on a CPU,
interpret-mode errors of both kernels vs the reference (no timings from the interpreter) and,
with libtpu, the block-size sweep of the TPU kernels compiled for v5p at the Wan shape with a
traced layout (`tpu_aot_rows`: compiles or not, grids and SMEM read from the program, grid
steps and padded FLOPs counted from the film's plan, an estimate from them; the kernel's own
CostEstimate is not used).

Default: L = 64 latent frames x 16x16 tokens = 16384, evenly spaced shots (`even_cuts`), float32,
B = 1. Dense baseline: `jax.nn.dot_product_attention` with the [L, L] bool mask (built outside
the timed program). Columns: `flop` = allowed pairs / L^2 (the ratio the mask allows), `exec` =
pairs the executor computes / L^2 (block padding + all rows stepping max(kv_count) times), time
ratio sparse/dense, and `goal` = whether time ratio <= 1.25 x flop ratio. Peak memory is
arguments + outputs + temporaries from `compiled.memory_analysis()`. Repeats alternate between
the two programs so that load from other processes hits both alike; the minimum is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from holocine_jax.attention import shot_attention
from holocine_jax.attention.plan import make_plan
from holocine_jax.shots import ShotLayout, even_cuts


def programs(layout, mask, block):
    """{(impl, pass): jitted fn(q, k, v, layout, mask)}."""
    def sparse(q, k, v, layout, mask):
        return shot_attention(q, k, v, layout, impl="xla", block_q=block, block_kv=block)

    def dense(q, k, v, layout, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    def with_grad(fn):
        def step(q, k, v, layout, mask):
            loss = lambda q, k, v: jnp.sum(fn(q, k, v, layout, mask).astype(jnp.float32) ** 2)
            return jax.grad(loss, (0, 1, 2))(q, k, v)
        return step

    return {("xla", "fwd"): sparse, ("dense", "fwd"): dense,
            ("xla", "fwd+bwd"): with_grad(sparse), ("dense", "fwd+bwd"): with_grad(dense)}


def peak_bytes(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return None
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def run_case(shots, args, rng):
    frames, hw = args.frames, (args.hw, args.hw)
    num_frames = 4 * (frames - 1) + 1
    layout = ShotLayout.stack([ShotLayout.from_cuts(num_frames, even_cuts(num_frames, shots),
                                                    latent_hw=hw, max_shots=max(args.shots))])
    length = layout.num_tokens
    allowed = layout.self_attention_mask("sparse")
    mask = allowed[:, None]  # [B, 1, L, L]
    plan = jax.jit(lambda l: make_plan(l, mode="sparse", block_q=args.block,
                                       block_kv=args.block))(layout)
    executed = (plan.kv_index.shape[1] * int(plan.kv_count.max()) * args.block ** 2) / length ** 2
    flop = float(allowed.mean())
    q, k, v = (jnp.asarray(rng.standard_normal((1, length, args.heads, args.head_dim)), jnp.float32)
               for _ in range(3))
    inputs = (q, k, v, layout, mask)
    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        res = {}
        for impl in ("xla", "dense"):
            fn = programs(layout, mask, args.block)[(impl, pass_)]
            compiled = jax.jit(fn).lower(*inputs).compile()
            jax.block_until_ready(compiled(*inputs))
            res[impl] = dict(compiled=compiled, times=[], peak=peak_bytes(compiled))
        for _ in range(args.repeats):
            for impl in ("xla", "dense"):
                t0 = time.perf_counter()
                jax.block_until_ready(res[impl]["compiled"](*inputs))
                res[impl]["times"].append(time.perf_counter() - t0)
        t_sparse, t_dense = min(res["xla"]["times"]), min(res["dense"]["times"])
        ratio = t_sparse / t_dense
        rows.append(dict(shots=shots, tokens=length, pass_=pass_, xla_s=t_sparse, dense_s=t_dense,
                         time_ratio=ratio, flop_ratio=flop, executed_ratio=executed,
                         goal_met=bool(ratio <= 1.25 * flop),
                         xla_peak_mb=_mb(res["xla"]["peak"]), dense_peak_mb=_mb(res["dense"]["peak"])))
    return rows


def kernel_rows(args, rng):
    """The `kernels` section (see the module doc)."""
    from holocine_jax.attention.pallas_gpu import shot_attention_pallas_gpu
    from holocine_jax.attention.pallas_tpu import shot_attention_pallas_tpu
    from holocine_jax.attention.reference import shot_attention_reference

    backend = jax.default_backend()
    if backend == "cpu":
        layout = ShotLayout.stack([ShotLayout.from_latent_cuts(7, [2, 5], latent_hw=(3, 4), max_shots=4)])
        q, k, v = (jnp.asarray(rng.standard_normal((1, 84, 2, 16)), jnp.float32) for _ in range(3))
        want = shot_attention_reference(q, k, v, layout)
        plan = make_plan(layout, block_q=16, block_kv=16)
        rows = [dict(kernel=name, interpret_rel_err=float(jnp.abs(fn(q, k, v, plan, interpret=True) - want).max()
                                                         / jnp.abs(want).max()))
                for name, fn in (("pallas_tpu", shot_attention_pallas_tpu), ("pallas_gpu", shot_attention_pallas_gpu))]
        return rows + tpu_aot_rows(args)
    kernel = shot_attention_pallas_gpu if backend == "gpu" else shot_attention_pallas_tpu
    rows = []
    for shots in args.shots:
        frames = 4 * (args.frames - 1) + 1
        layout = ShotLayout.stack([ShotLayout.from_cuts(frames, even_cuts(frames, shots),
                                                        latent_hw=(args.hw, args.hw), max_shots=max(args.shots))])
        film = jax.tree.map(lambda x: np.asarray(x)[0], layout)
        useful = 4 * args.head_dim * args.heads * film.num_allowed_pairs("sparse")
        block = args.gpu_block if backend == "gpu" else args.block
        plan = make_plan(layout, block_q=block, block_kv=block)
        q, k, v = (jnp.asarray(rng.standard_normal((1, layout.num_tokens, args.heads, args.head_dim)),
                               jnp.bfloat16) for _ in range(3))
        dense_kw = dict(implementation="cudnn") if backend == "gpu" else {}
        fns = {"pallas": lambda q, k, v: kernel(q, k, v, plan),
               "dense": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **dense_kw)}
        dense_flops = 4 * args.head_dim * args.heads * layout.num_tokens ** 2
        for pass_, units in (("fwd", 4), ("fwd+bwd", 14)):
            times = {}
            for name, fn in fns.items():
                f = fn if pass_ == "fwd" else (lambda fn: lambda q, k, v: jax.grad(
                    lambda *x: jnp.sum(fn(*x).astype(jnp.float32)), (0, 1, 2))(q, k, v))(fn)
                f = jax.jit(f)
                jax.block_until_ready(f(q, k, v))
                times[name] = min(_time(f, q, k, v) for _ in range(args.repeats))
            rows.append(dict(kernel=kernel.__name__, shots=shots, tokens=layout.num_tokens, pass_=pass_,
                             pallas_s=times["pallas"], dense_s=times["dense"],
                             speedup=times["dense"] / times["pallas"],
                             useful_tflops=useful * units / 4 / times["pallas"] / 1e12,
                             dense_tflops=dense_flops * units / 4 / times["dense"] / 1e12))
    return rows


STEP_OVERHEAD_S = 0.35e-6   # per Pallas TPU grid step (the Pallas TPU docs' figure)


def tpu_aot_rows(args):
    """The TPU kernels' forward + backward compiled for v5p with the layout traced (as in
    training), per chip at the README mesh (40 heads / 8 = 5 heads of 128, bf16), for each
    block size: whether it compiles (else which resource, which kernel), the kernels' grids and
    SMEM read back from the Mosaic modules, temporaries, the steps the grid runs (active block
    pairs of the film's plan, x heads, x 3 kernels; counted in test_pallas_work.py), the padded
    FLOPs they do / the useful ones, and est = FLOPs / peak + steps x STEP_OVERHEAD_S."""
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        return []
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from holocine_jax.attention.pallas_tpu import shot_attention_pallas_tpu
    from holocine_jax.compile import CHIPS, compile_failure, topology_devices
    from holocine_jax.parallel.hlo import mosaic_kernels

    heads_total, d = 40, 128
    devices = topology_devices("v5p:2x2x2")
    mesh = Mesh(np.array(devices).reshape(-1), ("heads",))
    heads = heads_total // mesh.size
    spec = P(None, None, "heads", None)
    rows = []
    for film_spec in args.tpu_films.split(","):
        frames, shots = (int(x) for x in film_spec.split(":"))
        film = ShotLayout.from_cuts(frames, even_cuts(frames, shots), latent_hw=(30, 52), max_shots=13)
        layout = film.broadcast_to_batch(1)
        length = layout.num_tokens
        useful = film.num_allowed_pairs("sparse") * d * heads * 18   # fwd 4 + dQ 6 + dK/dV 8
        for block in args.tpu_blocks.split(","):
            bq, bk = (int(x) for x in block.split("x"))
            print(f"shot_attention: v5p AOT, {frames} frames / {shots} shots, blocks {bq}x{bk} ...",
                  flush=True)

            def grads(q, k, v, layout, bq=bq, bk=bk):
                def local(q, k, v, layout):
                    plan = make_plan(layout, mode="sparse", block_q=bq, block_kv=bk)
                    return shot_attention_pallas_tpu(q, k, v, plan)
                attend = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3 + (P(),),
                                       out_specs=spec, check_vma=False)
                loss = lambda q, k, v: jnp.sum(attend(q, k, v, layout).astype(jnp.float32))
                return jax.grad(loss, (0, 1, 2))(q, k, v)

            x = jax.ShapeDtypeStruct((1, length, heads_total, d), jnp.bfloat16,
                                     sharding=NamedSharding(mesh, spec))
            traced = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=NamedSharding(mesh, P())), layout)
            pairs = int(np.asarray(make_plan(layout, mode="sparse", block_q=bq,
                                             block_kv=bk).kv_count).sum())
            steps = 3 * heads * pairs
            flops = 18 * heads * pairs * bq * bk * d
            row = dict(kernel="pallas_tpu v5p AOT", frames=frames, shots=shots, tokens=length,
                       block=f"{bq}x{bk}", heads_per_chip=heads, active_pairs=pairs,
                       grid_steps=steps, padded_over_useful=flops / useful,
                       est_ms=1e3 * (flops / CHIPS["TPU v5"]["flops"] + steps * STEP_OVERHEAD_S))
            try:
                c = jax.jit(grads).lower(x, x, x, traced).compile()
            except jax.errors.JaxRuntimeError as e:
                failure = compile_failure(str(e))
                if failure is None:
                    raise
                rows.append(dict(row, compiles=False, failure=f"{failure['resource']} in "
                                                              f"{failure.get('kernel', '-')}"))
                continue
            kernels = mosaic_kernels(c.as_text())
            rows.append(dict(row, compiles=True, temp_mb=_mb(c.memory_analysis().temp_size_in_bytes),
                             grids=sorted({str(k["grid"]) for k in kernels}),
                             smem_kib=max(k["smem_bytes"] for k in kernels) / 1024))
    return rows


def _time(f, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t0


def _mb(x):
    return None if x is None else round(x / 2**20, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--hw", type=int, default=16)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--shots", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--gpu-block", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sections", default="xla,kernels")
    parser.add_argument("--tpu-films", default="241:5,961:13", help="FRAMES:SHOTS,... (TPU AOT)")
    parser.add_argument("--tpu-blocks", default="128x128,256x256,512x256,256x512,512x512")
    parser.add_argument("--out", default="benchmarks/results/shot_attention.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sections = args.sections.split(",")
    rows = [r for shots in args.shots for r in run_case(shots, args, rng)] if "xla" in sections else []
    head = (f"{'shots':>5} {'L':>6} {'pass':>8} {'xla s':>8} {'dense s':>8} {'time':>6} {'flop':>6} "
            f"{'exec':>6} {'goal':>5} {'xla MB':>8} {'dense MB':>9}")
    print(head)
    for r in rows:
        print(f"{r['shots']:>5} {r['tokens']:>6} {r['pass_']:>8} {r['xla_s']:>8.3f} {r['dense_s']:>8.3f} "
              f"{r['time_ratio']:>6.3f} {r['flop_ratio']:>6.3f} {r['executed_ratio']:>6.3f} "
              f"{str(r['goal_met']):>5} {r['xla_peak_mb']:>8} {r['dense_peak_mb']:>9}")
    kernels = kernel_rows(args, rng) if "kernels" in sections else []
    for r in kernels:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "args": vars(args), "rows": rows, "kernels": kernels}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
