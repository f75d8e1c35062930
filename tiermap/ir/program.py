"""tiermap's tensor-graph IR: plain, immutable data.

A `Program` is a straight-line schedule of `Op`s over `Value`s (tensors). Ops with regions keep
their bodies: a reducer's scalar ops are summarised in `attrs`, and the ops of a `while` or `case`
body are kept as nested `Op`s in `body`, with the op's cost multiplied by its (static or assumed)
trip count; a body op's own cost counts one execution of the body. Values a body reads from outside
are also inputs of the op that holds the body. Only the frontend builds Programs from MLIR; every
pass reads them and returns new data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tiermap.ir.recompute import Recompute

# The op whose result is a literal (a weight baked into the program): placed like an input.
CONSTANT_KIND = "stablehlo.constant"

# Bits per element of each dtype tiermap knows, keyed by the short names the IR uses.
DTYPE_BITS: dict[str, int] = {
    "f64": 64, "f32": 32, "tf32": 32, "bf16": 16, "f16": 16,
    "f8E4M3FN": 8, "f8E5M2": 8, "f8E4M3FNUZ": 8, "f8E5M2FNUZ": 8, "f8E4M3B11FNUZ": 8,
    "f8E4M3": 8, "f8E3M4": 8, "f8E8M0FNU": 8, "f4E2M1FN": 4,
    "i1": 8, "i2": 2, "i4": 4, "i8": 8, "i16": 16, "i32": 32, "i64": 64,
    "ui1": 8, "ui2": 2, "ui4": 4, "ui8": 8, "ui16": 16, "ui32": 32, "ui64": 64,
    "c64": 64, "c128": 128, "token": 0,
}


@dataclass(frozen=True)
class TensorType:
    """A static tensor type: shape and dtype (short name such as "f32", "bf16", "i1")."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return (self.num_elements * DTYPE_BITS.get(self.dtype, 32) + 7) // 8

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class Value:
    """A tensor of the program: defined once, by a program input (producer_step -1) or by an op."""

    id: str
    type: TensorType
    producer_step: int

    @property
    def nbytes(self) -> int:
        return self.type.nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype


@dataclass(frozen=True, eq=True)
class Op:
    """One operation at one step of the schedule.

    `flops`, `transcendentals`, `bytes_read` and `bytes_written` cover every execution of the op
    (its trip count included). `bytes_read`/`bytes_written` are the op's compulsory traffic when
    run alone: what it must read of its operands and write of its results.
    """

    id: str
    kind: str
    step: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flops: float = 0.0
    transcendentals: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    trip_count: int = 1
    attrs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    body: tuple[Op, ...] = ()
    location: str = ""
    mlir_path: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def dtype(self) -> str:
        """The dtype the op computes in: its first floating input's, else its first output's."""
        return str(self.attrs.get("compute_dtype", "f32"))

    @property
    def flops_one_trip(self) -> float:
        """FLOPs with every loop body, nested ones included, counted once (as XLA counts)."""
        if not self.body:
            return self.flops if self.trip_count <= 1 else self.flops / self.trip_count
        return float(sum(op.flops_one_trip for op in self.body))


@dataclass(frozen=True)
class Program:
    """A whole program in schedule order: ops[i].step == i."""

    name: str
    ops: tuple[Op, ...]
    values: Mapping[str, Value]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    platform: str = "cpu"
    assumptions: tuple[str, ...] = ()
    source_mlir: str = field(default="", repr=False, compare=False)
    body_values: Mapping[str, Value] = field(default_factory=dict, repr=False)
    # A partitioned program (the per-device program of XLA's SPMD partitioner): how many devices
    # run it, and the HLO sharding of each input and output ("{replicated}",
    # "{devices=[8,1]<=[8]}"); shapes are per device. 1 and () for a one-device program.
    num_devices: int = 1
    input_shardings: tuple[str, ...] = ()
    output_shardings: tuple[str, ...] = ()
    # Values no memory holds (tiermap/loop_pairing.py): a loop's residual stack that the backward
    # loop recomputes instead of reading, a scan's output buffer whose every slice the loop
    # overwrites; no op moves their bytes and no tier holds them.
    unstored: frozenset[str] = frozenset()
    # Attention halves whose other half runs in another loop's body: forward in a scan, backward
    # in jax.grad's transposed scan (`tiermap.fusion.attention.AttentionPattern`s, set by
    # tiermap/loop_pairing.py); the fusion pass makes them attention groups, always chosen.
    paired_attention: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    # Tensors dropped after their forward use and computed again by repeated ops
    # (tiermap/ir/recompute.py; written by tiermap/recompute/).
    recomputes: tuple[Recompute, ...] = ()

    # --- derived facts --------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        return len(self.ops)

    @property
    def flops(self) -> float:
        """Total FLOPs, loop trip counts included (transcendentals are counted apart)."""
        return float(sum(op.flops for op in self.ops))

    @property
    def flops_one_trip(self) -> float:
        """FLOPs with each loop body (nested ones too) counted once, as XLA's cost analysis does."""
        return float(sum(op.flops_one_trip for op in self.ops))

    @property
    def collectives(self) -> tuple[Op, ...]:
        """The top-level ops that move bytes between devices (`ir.ops.COLLECTIVES`)."""
        return tuple(op for op in self.ops if "collective" in op.attrs)

    @property
    def transcendentals(self) -> float:
        return float(sum(op.transcendentals for op in self.ops))

    @property
    def tensors(self) -> tuple[Value, ...]:
        """Every top-level tensor, in definition order."""
        return tuple(self.values.values())

    @cached_property
    def consumers(self) -> Mapping[str, tuple[int, ...]]:
        """For each value, the steps of the ops that read it, in order."""
        users: dict[str, list[int]] = {vid: [] for vid in self.values}
        for op in self.ops:
            for vid in op.inputs:
                if not users[vid] or users[vid][-1] != op.step:
                    users[vid].append(op.step)
        return {vid: tuple(steps) for vid, steps in users.items()}

    @cached_property
    def _output_set(self) -> frozenset[str]:
        return frozenset(self.outputs)

    def producer_step(self, vid: str) -> int:
        return self.values[vid].producer_step

    def last_use_step(self, vid: str) -> int:
        """Last step at which `vid` must exist: its last reader, or the end for program outputs."""
        if vid in self._output_set:
            return max(self.num_steps - 1, self.values[vid].producer_step)
        users = self.consumers[vid]
        return users[-1] if users else max(self.values[vid].producer_step, 0)

    def live_range(self, vid: str) -> tuple[int, int]:
        """(first, last) step at which the value occupies memory; inputs start at step 0."""
        return max(self.producer_step(vid), 0), self.last_use_step(vid)

    def op(self, op_id: str) -> Op:
        """The op with this id: "op17" at the top level, "op17.r1.3" inside a body."""
        if "." not in op_id:
            return self.ops[int(op_id.removeprefix("op"))]
        for op in self.walk():
            if op.id == op_id:
                return op
        raise KeyError(f"no op {op_id!r} in program {self.name!r}")

    def walk(self) -> Iterator[Op]:
        """Every op, nested bodies included, depth first."""
        stack = list(reversed(self.ops))
        while stack:
            op = stack.pop()
            yield op
            stack.extend(reversed(op.body))

    # --- text forms -------------------------------------------------------------------------

    def to_mlir(self) -> str:
        """The StableHLO module this program was built from, as text."""
        return self.source_mlir

    def __str__(self) -> str:
        return format_program(self)


def _fmt_num(x: float) -> str:
    return f"{x:.4g}"


def format_op(op: Op, values: Mapping[str, Value], indent: str = "  ") -> list[str]:
    """One line per op (and per nested body op), stable for golden tests."""
    outs = ", ".join(f"%{v}: {values[v].type}" for v in op.outputs if v in values) or "()"
    if not all(v in values for v in op.outputs):
        outs = ", ".join(f"%{v}" for v in op.outputs) or "()"
    ins = ", ".join(f"%{v}" for v in op.inputs)
    extra = []
    if op.flops:
        extra.append(f"flops={_fmt_num(op.flops)}")
    if op.transcendentals:
        extra.append(f"transc={_fmt_num(op.transcendentals)}")
    if op.trip_count != 1:
        extra.append(f"trips={op.trip_count}")
    for key in sorted(op.attrs):
        if key in {"compute_dtype"}:
            continue
        extra.append(f"{key}={op.attrs[key]}")
    tail = f"  # {' '.join(extra)}" if extra else ""
    lines = [f"{indent}{op.id}: {outs} = {op.kind}({ins}){tail}"]
    for sub in op.body:
        lines.extend(format_op(sub, values, indent + "  "))
    return lines


def format_program(program: Program) -> str:
    args = ", ".join(f"%{v}: {program.values[v].type}" for v in program.inputs)
    lines = [f"program @{program.name}({args}) {{"]
    every = {**program.values, **program.body_values}
    for op in program.ops:
        lines.extend(format_op(op, every))
    lines.append(f"  return {', '.join('%' + v for v in program.outputs)}")
    lines.append("}")
    return "\n".join(lines)
