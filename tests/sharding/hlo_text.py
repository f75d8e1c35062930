"""Facts read straight from XLA, independently of tiermap's frontend: the collectives of a
compiled module's HLO text and the memory analysis of its executable."""

from __future__ import annotations

import math
import re
from typing import Any

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
               "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64|u64)\[([\d,]*)\]")
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (?P<shape>.*?) (?P<kind>all-reduce|all-gather|reduce-scatter|"
    r"all-to-all|collective-permute)(?P<async>-start)?\(")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]+)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (a shape or a tuple of shapes)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def group_size(line: str, num_devices: int) -> int:
    listed = _GROUPS_LIST.search(line)
    if listed:
        return len(listed.group(1).split(","))
    iota = _GROUPS_IOTA.search(line)
    if iota:
        return int(iota.group(2))
    return num_devices


def hlo_collective_bytes(hlo_text: str, num_devices: int) -> dict[str, int]:
    """Payload bytes per collective kind (underscored, as tiermap names them) in the ENTRY
    computation and every other computation of a compiled module: the result of an all-gather,
    all-reduce, all-to-all or collective-permute; result x group size for a reduce-scatter
    (its operand)."""
    found: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.match(line)
        if not m:
            continue
        if m.group("async"):
            raise AssertionError(f"async collective in the HLO, not handled here: {line[:120]}")
        kind = m.group("kind").replace("-", "_")
        nbytes = shape_bytes(m.group("shape"))
        if kind == "reduce_scatter":
            nbytes *= group_size(line, num_devices)
        found[kind] = found.get(kind, 0) + nbytes
    return found


def memory_facts(compiled: Any, num_outputs: int) -> dict[str, int]:
    """Per-device argument and output bytes from `compiled.memory_analysis()`. XLA's output
    size includes the output tuple's table of buffer pointers (8 bytes per output when there is
    more than one), which holds no tensor: it is taken off."""
    ma = compiled.memory_analysis()
    table = 8 * num_outputs if num_outputs > 1 else 0
    return {"argument_bytes": int(ma.argument_size_in_bytes),
            "output_bytes": int(ma.output_size_in_bytes) - table,
            "output_size_in_bytes": int(ma.output_size_in_bytes),
            "temp_bytes": int(ma.temp_size_in_bytes)}
