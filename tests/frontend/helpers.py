"""Helpers shared by the frontend tests: XLA's FLOP count and the IR invariants."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from tiermap.frontend.annotate import annotate_mlir
from tiermap.frontend.mlir import parse_module
from tiermap.ir.program import Op, Program, Value

FLOP_TOLERANCE = 0.02  # relative; never loosen it


def xla_flops(lowered: Any) -> float:
    """FLOPs of `jax.jit(fn).lower(...)` by XLA's cost analysis, custom calls counted as 0.

    XLA reports -1 FLOPs for each custom call it cannot see into (lapack kernels, host callbacks,
    the "Sharding" call a sharding constraint becomes); tiermap counts them as 0, so they are
    added back here.
    """
    flops = float(lowered.cost_analysis().get("flops", 0.0))
    hlo = lowered.as_text(dialect="hlo")
    return flops + len(re.findall(r" custom-call\(", hlo))


def assert_flops_agree(program: Program, expected: float, what: str) -> None:
    ours = program.flops_one_trip
    assert abs(ours - expected) <= FLOP_TOLERANCE * max(abs(expected), 1.0), (
        f"{what}: tiermap counts {ours:.6g} FLOPs, XLA {expected:.6g}")


def _check_block(ops: Iterable[Op], visible: set[str], values: Mapping[str, Value],
                 defined: set[str], where: str) -> None:
    """Check one block: `visible` holds what its ops may read; grows as they define values."""
    local: set[str] = set()  # defined in this block: their producer steps count in its steps
    for step, op in enumerate(ops):
        assert op.step == step, f"{where}{op.id}: step {op.step} at position {step}"
        assert op.flops >= 0 and op.transcendentals >= 0, f"{op.id}: negative flops"
        assert op.bytes_read >= 0 and op.bytes_written >= 0, f"{op.id}: negative bytes"
        assert op.trip_count >= 1, f"{op.id}: trip count {op.trip_count}"
        for vid in op.inputs:
            assert vid in visible, f"{op.id} reads {vid}, which it cannot see"
            if vid in local:
                assert values[vid].producer_step < op.step, f"{op.id} reads {vid} too early"
        if op.body:
            # A body sees its region arguments and the outer values its op lists as inputs.
            n_operands = int(op.attrs.get("num_operands", len(op.inputs)))
            inner = set(op.inputs[n_operands:])
            for args in op.attrs.get("region_args", ()):
                for vid in args:
                    assert vid not in defined, f"{vid} defined twice"
                    defined.add(vid)
                    inner.add(vid)
            regions: dict[str, list[Op]] = {}
            for sub in op.body:
                regions.setdefault(sub.id.rsplit(".", 1)[0], []).append(sub)
            for region_ops in regions.values():
                _check_block(region_ops, set(inner), values, defined, f"{op.id}/")
        for vid in op.outputs:
            assert vid not in defined, f"{vid} defined twice"
            assert values[vid].producer_step == op.step, f"{vid}: wrong producer step"
            defined.add(vid)
            visible.add(vid)
            local.add(vid)


def check_invariants(program: Program) -> None:
    """The IR contract: values defined once and before use, steps in order, ranges in bounds."""
    assert [op.step for op in program.ops] == list(range(program.num_steps))
    all_ops = list(program.walk())
    assert len({op.id for op in all_ops}) == len(all_ops), "duplicate op ids"
    every = {**program.values, **program.body_values}
    defined: set[str] = set()
    for vid in program.inputs:
        assert program.values[vid].producer_step == -1, f"input {vid} has a producer"
        assert vid not in defined
        defined.add(vid)
    _check_block(program.ops, set(defined), every, defined, "")
    top_defined = set(program.inputs) | {v for op in program.ops for v in op.outputs}
    assert set(program.values) == top_defined, "values table does not match the definitions"
    for vid in program.outputs:
        assert vid in program.values, f"output {vid} is not a top-level value"
    for vid in program.values:
        first, last = program.live_range(vid)
        assert 0 <= first <= max(last, 0), f"{vid}: live range {first}..{last}"
        assert last <= max(program.num_steps - 1, 0), f"{vid}: live past the schedule"
        for step in program.consumers[vid]:
            assert first <= step <= last, f"{vid}: read at {step} outside {first}..{last}"
    assert program.flops >= 0 and program.flops_one_trip >= 0


def annotated_ops(text: str) -> dict[str, tuple[str, dict[str, str]]]:
    """tiermap.id → (op name, {attribute name: printed value}) over a whole annotated module."""
    module = parse_module(text)
    found: dict[str, tuple[str, dict[str, str]]] = {}
    with module.context:
        stack = [module.operation]
        while stack:
            op = stack.pop()
            for region in op.regions:
                for block in region.blocks:
                    for wrapped in block.operations:
                        inner = wrapped.operation
                        table = inner.attributes
                        attrs = {table[i].name: str(table[i].attr) for i in range(len(table))
                                 if table[i].name.startswith("tiermap.")}
                        if "tiermap.id" in attrs:
                            op_id = attrs["tiermap.id"].strip('"')
                            assert op_id not in found, f"{op_id} annotated twice"
                            found[op_id] = (inner.name, attrs)
                        stack.append(inner)
    return found


def round_trip(program: Program) -> tuple[str, dict[str, tuple[str, dict[str, str]]]]:
    """Annotate every op with its id; check each id lands on an op of the op's kind."""
    attrs = {op.id: {"id": op.id} for op in program.walk()}
    text = annotate_mlir(program, attrs)
    found = annotated_ops(text)
    assert set(found) == set(attrs)
    for op in program.walk():
        name, _ = found[op.id]
        assert name == op.attrs.get("folded_from", op.kind), op.id
    return text, found
