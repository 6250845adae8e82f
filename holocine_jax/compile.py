"""Ahead-of-time compilation for a TPU topology from any host (DESIGN §6; needs libtpu).

    report = compile_report(load_config("wan22_t2v_a14b"), "v5p:4x4x4", num_shots=5)
    print(format_report(report))

Compiles the training step (and one guided sampling step) on abstract inputs laid out on the
config's mesh over the topology's devices, then reads the compiled program: per-device memory
(arguments, temporaries, outputs) against HBM and bytes moved per collective kind (from the HLO,
loop bodies x trip counts). Each Pallas TPU kernel is listed with its grid (dynamic where the
work follows the film) and SMEM, read from the Mosaic modules in the HLO. A failure says which
resource ran out: a kernel's SMEM / VMEM (the program does not compile) or HBM (it does not fit). FLOPs are the model's, counted from the architecture and the film's
allowed attention pairs: XLA's `cost_analysis` counts a while-loop body once, so for a scanned
40-layer model it reports ~1/40 of the work (it is kept in the report as `xla_flops`). The
roofline step time is max(FLOPs / peak, collective bytes / ICI bandwidth) (perfect overlap)
and their sum (none).
"""
from __future__ import annotations

import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from holocine_jax.model import WanDiT
from holocine_jax.parallel.hlo import collective_bytes, mosaic_kernels
from holocine_jax.parallel.mesh import batch_shardings, make_mesh, state_shardings
from holocine_jax.shots import ShotLayout, even_cuts, latent_shape

# Per chip, from the Cloud TPU system-architecture pages: HBM bytes, bf16 peak FLOP/s, HBM
# bandwidth (B/s), ICI bandwidth (B/s, all links together).
CHIPS = {
    "TPU v5": dict(name="v5p", hbm=95e9, flops=459e12, hbm_bw=2765e9, ici_bw=4800e9 / 8),
    "TPU v5 lite": dict(name="v5e", hbm=16 * 2**30, flops=197e12, hbm_bw=819e9, ici_bw=1600e9 / 8),
}
HEADROOM = 0.10


def topology_devices(topology: str):
    """Devices of a TPU topology name such as "v5p:4x4x4" or "v5e:2x2" (compile-only)."""
    from jax.experimental import topologies
    # compile-only: no chip is opened, so another process holding libtpu's lock is no conflict
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # libtpu missing or an unknown topology name
        raise ValueError(f"cannot describe TPU topology {topology!r} (is the `tpu` extra, i.e. "
                         f"libtpu, installed?): {e}") from e


def film_layout(config, num_shots: int, batch: int) -> ShotLayout:
    """A concrete layout of `num_shots` even shots with synthetic caption windows (the first
    half of the text split evenly), broadcast to `batch`."""
    bounds = np.linspace(0, config.model.text_len // 2, num_shots + 2).astype(np.int32)
    layout = ShotLayout.for_config(config, even_cuts(config.video.num_frames, num_shots),
                                   text_windows=np.stack([bounds[:-1], bounds[1:]], axis=1),
                                   text_pad_start=int(bounds[-1]))
    return layout.broadcast_to_batch(batch)


def model_flops(config, layout: ShotLayout) -> float:
    """Forward FLOPs of one film (matmuls + attention scores on the allowed pairs)."""
    m = config.model
    film = jax.tree.map(lambda x: np.asarray(x)[0], layout)
    tokens, text = film.num_tokens, m.text_len
    patch = math.prod(m.patch_size)
    per_layer = (2 * tokens * m.dim * m.dim * 6            # self q, k, v, o + cross q, o
                 + 2 * text * m.dim * m.dim * 2             # cross k, v on the text
                 + 2 * tokens * m.dim * m.ffn_dim * 2       # FFN
                 + 4 * m.dim * film.num_allowed_pairs(config.attention.mode)   # QK^T and PV
                 + 4 * m.dim * tokens * text)                # cross-attention scores
    io = 2 * tokens * m.dim * patch * (m.in_channels + m.out_channels)
    return float(m.num_layers * per_layer + io)


def abstract_batch(config, mesh, *, num_shots: int):
    """ShapeDtypeStructs of one global training batch: latents, text states and a film layout
    with `num_shots` even shots and caption windows (only shapes matter); with caption dropout
    also the empty prompt's states."""
    b = int(config.train.batch_size)
    shape = latent_shape(config, b)
    text_len = config.model.text_len
    layout = film_layout(config, num_shots, b)
    batch = dict(latents=jax.ShapeDtypeStruct(shape, jnp.float32),
                 text_states=jax.ShapeDtypeStruct((b, text_len, config.model.text_dim), jnp.float32),
                 layout=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), layout))
    batch = _with_shardings(batch, batch_shardings(batch, mesh, config.mesh.rules))
    if float(config.train.caption_dropout) > 0:   # the empty prompt's states, replicated
        batch["empty_text_states"] = jax.ShapeDtypeStruct(
            (text_len, config.model.text_dim), jnp.float32,
            sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return batch


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_train_step(config, mesh, *, num_shots: int):
    """(compiled training step, its abstract sharded arguments) for state + batch on `mesh`."""
    from holocine_jax.train.state import init_train_state, split_model
    from holocine_jax.train.step import make_train_step

    graphdef, params, frozen, rest = split_model(
        nnx.eval_shape(lambda: WanDiT.from_config(config, rngs=nnx.Rngs(0))))
    state = jax.eval_shape(lambda p, f: init_train_state(config, p, f), params, frozen)
    sharding = state_shardings(state, mesh, config.mesh.rules)
    batch = abstract_batch(config, mesh, num_shots=num_shots)
    step = jax.jit(make_train_step(config, graphdef, rest), out_shardings=(sharding, None),
                   donate_argnums=0)
    args = (_with_shardings(state, sharding), batch)
    with jax.set_mesh(mesh):
        return step.lower(*args).compile(), args


def compile_sample_step(config, mesh, *, num_shots: int):
    """(compiled guided denoising step (both CFG passes in one batch), its abstract arguments)."""
    from holocine_jax.sample.sampler import denoise_step, scheduler_from_config

    graphdef, params = nnx.split(nnx.eval_shape(lambda: WanDiT.from_config(config, rngs=nnx.Rngs(0))))
    params_sh = state_shardings(params, mesh, config.mesh.rules)
    batch = abstract_batch(config, mesh, num_shots=num_shots)
    scheduler = scheduler_from_config(config)
    state = jax.eval_shape(scheduler.init_state, batch["latents"])
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(
        batch["latents"].sharding if x.shape == batch["latents"].shape else replicated)), state)
    negative_layout = _with_shardings(jax.eval_shape(lambda l: l.without_text_windows(), batch["layout"]),
                                      jax.tree.map(lambda x: x.sharding, batch["layout"]))
    step = jax.jit(functools.partial(denoise_step, graphdef, scheduler,
                                     float(np.max(config.sample.guidance_scale))))
    args = (_with_shardings(params, params_sh), state, batch["latents"],
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), batch["text_states"],
            batch["text_states"], batch["layout"], negative_layout)
    with jax.set_mesh(mesh):
        return step.lower(*args).compile(), args


def program_report(compiled, chip: dict, num_devices: int, flops_total: float) -> dict:
    """Per-device memory, collective bytes and roofline times of a compiled program that does
    `flops_total` FLOPs over all devices."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    collectives = collective_bytes(hlo)
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + \
        mem.temp_size_in_bytes
    flops = flops_total / num_devices
    ici = float(sum(collectives.values()))
    times = dict(compute=flops / chip["flops"], ici=ici / chip["ici_bw"])
    return dict(
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        total_bytes=total, hbm_bytes=chip["hbm"], fits=total <= (1 - HEADROOM) * chip["hbm"],
        headroom=1 - total / chip["hbm"], flops_per_device=flops, flops_total=flops_total,
        xla_flops=float(cost.get("flops", 0.0)), collective_bytes=collectives,
        roofline_seconds=max(times.values()), serial_seconds=sum(times.values()),
        roofline_parts=times, kernels=mosaic_kernels(hlo))


def compile_report(config, topology: str, *, num_shots: int = 5, programs=("train", "sample")) -> dict:
    """Compile `programs` for `topology` on the config's mesh and report them (see module doc)."""
    devices = topology_devices(topology)
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise ValueError(f"no chip table for device kind {kind!r} (known: {sorted(CHIPS)})")
    chip = CHIPS[kind]
    mesh = make_mesh(config.mesh, devices)
    check_divisibility(config, mesh)
    report = dict(config=config.name, topology=topology, chip=chip["name"], devices=len(devices),
                  mesh=dict(mesh.shape), batch_size=int(config.train.batch_size),
                  num_frames=int(config.video.num_frames), height=int(config.video.height),
                  width=int(config.video.width), num_shots=num_shots,
                  attention=dict(mode=config.attention.mode, impl=config.attention.impl,
                                 context=config.attention.context_strategy), programs={})
    compilers = dict(train=compile_train_step, sample=compile_sample_step)
    film = model_flops(config, film_layout(config, num_shots, 1))
    passes = dict(train=3 + (config.model.remat != "none"),   # fwd + bwd (2x) + remat re-forward
                  sample=2 if np.max(config.sample.guidance_scale) != 1.0 else 1)
    for name in programs:
        try:
            compiled, args = compilers[name](config, mesh, num_shots=num_shots)
        except jax.errors.JaxRuntimeError as e:   # HBM exceeded, or a kernel's SMEM / VMEM
            failure = compile_failure(str(e))
            if failure is None:
                raise
            report["programs"][name] = failure
            continue
        flops = film * passes[name] * int(config.train.batch_size)
        report["programs"][name] = program_report(compiled, chip, len(devices), flops)
        report["programs"][name]["largest_arguments"] = largest_buffers(args)
    return report


def compile_failure(message: str) -> dict | None:
    """What a failed TPU compile says, or None when it is not a resource failure: an on-chip
    space (SMEM / VMEM) that a Pallas kernel exceeds -> the program does not compile (which
    resource, which kernel); HBM exceeded -> it compiles but does not fit."""
    if "RESOURCE_EXHAUSTED" not in message and "Mosaic" not in message:
        return None
    first = next((l for l in message.splitlines() if l.strip()), message)
    space = re.search(r"space=(\w+)", message)
    resource = space.group(1).upper() if space else "HBM"
    if resource == "HBM" and "Mosaic" not in message:
        return dict(fits=False, compiles=True, resource="HBM", error=first)
    kernel = re.search(r"\b(shot_attention_\w+|\w+_kernel)\b", message)
    return dict(fits=False, compiles=False, resource=resource if space else "Mosaic",
                kernel=kernel.group(1) if kernel else "a Pallas kernel", error=first)


def check_divisibility(config, mesh) -> None:
    """Clear errors before compiling: heads vs tensor (x context for ulysses), tokens vs context."""
    m, sizes = config.model, dict(mesh.shape)
    film = ShotLayout.for_config(config, [])
    frames = film.num_latent_frames // m.patch_size[0]
    tokens = frames * film.tokens_per_frame
    if m.num_heads % sizes["tensor"]:
        raise ValueError(f"config.model.num_heads={m.num_heads} is not divisible by "
                         f"config.mesh.tensor={sizes['tensor']}")
    if config.attention.context_strategy == "ulysses" and m.num_heads % (sizes["tensor"] * sizes["context"]):
        raise ValueError(f"ulysses context parallelism splits heads: config.model.num_heads="
                         f"{m.num_heads} is not divisible by tensor x context = "
                         f"{sizes['tensor']} x {sizes['context']}")
    if tokens % sizes["context"]:
        raise ValueError(f"the film has {tokens} tokens ({frames} latent frames x "
                         f"{film.tokens_per_frame}), not divisible by config.mesh.context="
                         f"{sizes['context']}")


def largest_buffers(tree, n: int = 5) -> list[dict]:
    """The `n` largest per-device arrays of an abstract pytree with shardings."""
    rows = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        rows.append(dict(name=jax.tree_util.keystr(path), shape=list(x.shape),
                         device_bytes=int(math.prod(shard)) * jnp.dtype(x.dtype).itemsize))
    return sorted(rows, key=lambda r: -r["device_bytes"])[:n]


def over_budget(report: dict) -> str:
    """'' when every program fits HBM with the headroom; else what is over and by how much."""
    problems = []
    for name, r in report["programs"].items():
        if "error" in r:
            problems.append(_failure_text(name, r))
        elif not r["fits"]:
            budget = (1 - HEADROOM) * r["hbm_bytes"]
            biggest = "; ".join(f"{b['name']} {b['shape']} {b['device_bytes'] / 2**30:.2f} GiB"
                                for b in r["largest_arguments"])
            problems.append(
                f"{name} needs {r['total_bytes'] / 2**30:.2f} GiB per device, "
                f"{(r['total_bytes'] - budget) / 2**30:.2f} GiB over {budget / 2**30:.2f} GiB "
                f"({100 * (1 - HEADROOM):.0f}% of {r['hbm_bytes'] / 2**30:.2f} GiB HBM); temporaries "
                f"{r['temp_bytes'] / 2**30:.2f} GiB; largest per-device arguments: {biggest}")
    return " | ".join(problems)


def _failure_text(name: str, r: dict) -> str:
    """One line for a program that failed: does not compile (resource, kernel) / does not fit."""
    if r.get("compiles", True):
        return f"{name} does not fit: HBM exhausted: {r['error']}"
    return (f"{name} does not compile for this topology: {r['resource']} exhausted in "
            f"{r['kernel']}: {r['error']}")


def format_report(report: dict) -> str:
    """The report as a fixed-width table."""
    gib = lambda x: f"{x / 2**30:8.2f}"
    lines = [f"{report['config']} on {report['topology']} ({report['devices']} x {report['chip']}), "
             f"mesh {report['mesh']}, batch {report['batch_size']}, {report['num_frames']} frames "
             f"{report['height']}x{report['width']}, {report['num_shots']} shots, attention "
             f"{report['attention']}",
             f"{'program':8} {'args GiB':>9} {'temp GiB':>9} {'out GiB':>8} {'total':>8} {'HBM':>8} "
             f"{'fits':>5} {'TFLOP/dev':>10} {'coll GiB':>9} {'step s':>13}"]
    for name, r in report["programs"].items():
        if "error" in r:
            lines.append(_failure_text(f"{name:8}", r))
            continue
        lines.append(f"{name:8} {gib(r['argument_bytes'])} {gib(r['temp_bytes'])} "
                     f"{gib(r['output_bytes'] - r['alias_bytes'])} {gib(r['total_bytes'])} "
                     f"{gib(r['hbm_bytes'])} {'yes' if r['fits'] else 'NO':>5} "
                     f"{r['flops_per_device'] / 1e12:10.2f} {gib(sum(r['collective_bytes'].values()))} "
                     f"{r['roofline_seconds']:6.2f}-{r['serial_seconds']:<6.2f}")
        kinds = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sorted(r["collective_bytes"].items()))
        lines.append(f"{'':8} collectives: {kinds or 'none'}")
        for kern in r.get("kernels", []):
            grid = " x ".join("dynamic" if g is None else str(g) for g in kern["grid"])
            lines.append(f"{'':8} kernel {kern['name']}: grid {grid}, SMEM "
                         f"{kern['smem_bytes'] / 1024:.1f} KiB, {kern['calls']} call site(s)")
    return "\n".join(lines)
