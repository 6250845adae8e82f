"""Bytes moved by collectives, read from a compiled program's HLO text (DESIGN §6).

    collective_bytes(jax.jit(f).lower(*args).compile().as_text())
    -> {"all-gather": 1572864, "all-to-all": 393216, ...}

Per device: each collective instruction counts the bytes of the buffer it produces (all-gather:
the gathered buffer; all-reduce / all-to-all / collective-permute / reduce-scatter: their
outputs, summed over tuple elements). Async pairs count once, at `-start` (its tuple holds
operand and output: the output is counted); `-done` and tuple reads are not collectives.
Instructions inside loop bodies count once per appearance in the text, not per trip: compare
programs whose collectives are not inside while loops, or scale by the trip count yourself.
"""
from __future__ import annotations

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


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """{collective kind: bytes per device} over the instructions of `hlo_text` (kinds absent
    from the program are absent from the dict)."""
    totals: dict[str, float] = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.search(line)
        if not m:
            continue
        op = m.group("op")
        kind = op[: -len("-start")] if op.endswith("-start") else op
        if kind not in KINDS:
            continue
        sizes = [s for s in _arrays(m.group("type")) if s > 4 or not op.endswith("-start")]
        if op.endswith("-start"):   # (operand(s), output(s), [u32 contexts]): count the outputs
            if kind == "all-gather":
                sizes = [max(sizes)]
            elif len(sizes) > 1:
                sizes = sizes[len(sizes) // 2:]
        totals[kind] = totals.get(kind, 0) + sum(sizes)
    return {k: int(v) for k, v in totals.items()}
