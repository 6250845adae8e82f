"""What a compiled program does, read from its HLO text (DESIGN §6): bytes moved by
collectives, and the Mosaic (Pallas TPU) kernels it calls.

    collective_bytes(jax.jit(f).lower(*args).compile().as_text())
    -> {"all-gather": 1572864, "all-to-all": 393216, ...}

Per device: each collective instruction counts the bytes of the buffer it produces (all-gather:
the gathered buffer; all-reduce / all-to-all / collective-permute / reduce-scatter: their
outputs, summed over tuple elements). Async pairs count once, at `-start` (its tuple holds
operand and output: the output is counted); `-done` and tuple reads are not collectives.
An instruction inside a while body counts once per trip when the loop's condition compares the
counter with a constant (scans: the layer scan runs `num_layers` trips); loops with a data-
dependent bound (the attention's active-block loop) count once.

    mosaic_kernels(compiled.as_text())
    -> [{"name": "shot_attention_fwd", "grid": (5, None), "smem_bytes": 65536, "calls": 1}, ...]

Each `tpu_custom_call` carries its Mosaic module (MLIR bytecode in the backend config); it is
deserialised with jaxlib's TPU dialect and the kernel's iteration bounds (None: a dynamic grid
dimension, sized at run time) and its SMEM operands (scalar prefetch) are read from it.
"""
from __future__ import annotations

import base64
import json
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
          "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_INSTRUCTION = re.compile(r"=\s*(?P<type>\(.*?\)|[a-z0-9]+\[[0-9,]*\]\S*)\s+"
                          r"(?P<op>[a-z\-]+)\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def _arrays(type_text: str) -> list[float]:
    """Byte sizes of the arrays in an HLO result type (`f32[2,4]{1,0}` or a tuple of them)."""
    sizes = []
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in _BYTES:
            sizes.append(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
    return sizes


_HEADER = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"(?:condition|body|calls|to_apply|branch_computations|called_computations)"
                    r"=\{?(?P<names>%[^\s,}]+(?:,\s*%[^\s,}]+)*)")
_WHILE = re.compile(r"while\(.*condition=%(?P<cond>[^\s,]+),\s*body=%(?P<body>[^\s,]+)")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} and the entry computation's name."""
    blocks, entry, current = {}, "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group("name")
            blocks[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            blocks[current].append(line)
    return blocks, entry


def _trip_count(condition: list[str]) -> int:
    """N for a `counter < constant(N)` loop condition, else 1 (unknown bound)."""
    constants = dict(re.findall(r"%(\S+) = s32\[\]\S* constant\((\d+)\)", "\n".join(condition)))
    for line in condition:
        if line.lstrip().startswith("ROOT") and "compare(" in line and "direction=LT" in line:
            operands = re.search(r"compare\(([^)]*)\)", line).group(1)
            for name in re.findall(r"%(\S+?)(?:,|$)", operands):
                if name in constants:
                    return int(constants[name])
    return 1


def computation_multiplicity(hlo_text: str) -> dict[str, int]:
    """How many times each computation runs per program execution (while bodies x trips)."""
    blocks, entry = _computations(hlo_text)
    mult = {entry: 1}
    stack = [entry]
    while stack:
        name = stack.pop()
        for line in blocks.get(name, []):
            loop = _WHILE.search(line)
            trips = {loop.group("body"): _trip_count(blocks.get(loop.group("cond"), []))} if loop else {}
            for m in _CALLS.finditer(line):
                for callee in re.findall(r"%([^\s,}]+)", m.group("names")):
                    count = mult[name] * trips.get(callee, 1)
                    if callee in blocks and mult.get(callee, 0) < count:
                        mult[callee] = count
                        stack.append(callee)
    return mult


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """{collective kind: bytes per device per execution} over `hlo_text` (kinds absent from the
    program are absent from the dict)."""
    blocks, _ = _computations(hlo_text)
    mult = computation_multiplicity(hlo_text)
    totals: dict[str, float] = {}
    for comp, lines in blocks.items():
        for line in lines:
            _count(line, mult.get(comp, 1), totals)
    return {k: int(v) for k, v in totals.items()}


def _count(line: str, times: int, totals: dict) -> None:
    """Add the collective bytes of one instruction line (x times) to totals."""
    m = _INSTRUCTION.search(line)
    if not m:
        return
    op = m.group("op")
    kind = op[: -len("-start")] if op.endswith("-start") else op
    if kind not in KINDS:
        return
    sizes = [s for s in _arrays(m.group("type")) if s > 4 or not op.endswith("-start")]
    if op.endswith("-start"):   # (operand(s), output(s), [u32 contexts]): count the outputs
        if kind == "all-gather":
            sizes = [max(sizes)]
        elif len(sizes) > 1:
            sizes = sizes[len(sizes) // 2:]
    totals[kind] = totals.get(kind, 0) + times * sum(sizes)


_KERNEL = re.compile(r"func\.func @(?P<name>[\w.]+)\((?P<args>.*?)\)\s+attributes\s*\{(?P<attrs>.*)\}")
_BOUNDS = re.compile(r"iteration_bounds = array<i64(?::\s*(?P<dims>[-0-9, ]+))?>")
_SMEM = re.compile(r"memref<(?P<dims>(?:\d+x)*)(?P<dtype>[a-z]+\d*), #tpu\.memory_space<smem>>")
_DYNAMIC = -(2**63)


def mosaic_kernels(hlo_text: str) -> list[dict]:
    """The Mosaic kernels of a compiled TPU program, one entry per distinct kernel: name, grid
    (iteration bounds, None where dynamic), SMEM bytes of its operands, and how many custom
    calls in the HLO run it. Needs libtpu's jaxlib TPU dialect (the `tpu` extra)."""
    kernels: dict[str, dict] = {}
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        config = _json_after(line, "backend_config=")
        module = _mosaic_text(base64.b64decode(config["custom_call_config"]["body"]))
        main = _KERNEL.search(module)
        if main is None:
            raise ValueError("a tpu_custom_call without a kernel function in its Mosaic module")
        bounds = _BOUNDS.search(main.group("attrs"))
        dims = [int(d) for d in (bounds.group("dims") or "").split(",") if d.strip()] if bounds else []
        smem = sum(_BYTES[{"i32": "s32", "f32": "f32", "i1": "pred"}.get(m.group("dtype"), "s32")]
                   * math.prod(int(d) for d in m.group("dims").split("x") if d)
                   for m in _SMEM.finditer(main.group("args")))
        entry = kernels.setdefault(main.group("name"), dict(
            name=main.group("name"), grid=tuple(None if d == _DYNAMIC else d for d in dims),
            smem_bytes=int(smem), calls=0))
        entry["calls"] += 1
    return list(kernels.values())


def _json_after(line: str, key: str) -> dict:
    """The JSON object that follows `key` on an HLO instruction line."""
    text = line[line.index(key) + len(key):]
    return json.JSONDecoder().raw_decode(text)[0]


def _mosaic_text(bytecode: bytes) -> str:
    """A serialised Mosaic module (versioned bytecode) as MLIR text."""
    from jax._src.interpreters import mlir
    from jax._src.lib import tpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.passmanager import PassManager

    ctx = mlir.make_ir_context()
    tpu.register_dialect(ctx)
    with ctx, ir.Location.unknown():
        ctx.allow_unregistered_dialects = True
        module = ir.Module.parse(bytecode)
        PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(module.operation)
        return str(module)
