"""The two-stream schedule of a sharded plan, on tiny programs worked out by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tiermap.costmodel.communication import check_devices, communication_plan
from tiermap.errors import ChoiceError
from tiermap.hardware import Target, load_target
from tiermap.hardware.interconnect import Interconnect
from tiermap.ir.program import Op, Program, TensorType, Value

F32 = TensorType((1000,), "f32")  # 4000 bytes


def _program(reads: dict[str, tuple[str, ...]]) -> Program:
    """ops a (compute), ar (all-reduce of a), b (compute, reads `reads['b']`), c (reads ar)."""
    values = {"x": Value("x", F32, -1)}
    specs = [("a", "stablehlo.add", ("x",)), ("ar", "stablehlo.all_reduce", ("a",)),
             ("b", "stablehlo.multiply", reads["b"]), ("c", "stablehlo.add", ("ar", "b"))]
    ops = []
    for step, (name, kind, ins) in enumerate(specs):
        attrs = ({"collective": "all_reduce", "group_size": 8, "num_groups": 1,
                  "payload_bytes": F32.nbytes} if kind.endswith("all_reduce") else {})
        ops.append(Op(f"op{step}", kind, step, ins, (name,), attrs=attrs))
        values[name] = Value(name, F32, step)
    return Program("toy", tuple(ops), values, ("x",), ("c",), num_devices=8)


def _target() -> Target:
    # all-reduce of 4000 B on 8 devices: 2 * 7/8 * 4000 = 7000 wire bytes at 2 x 3500 B/s = 1 s,
    # plus 2 steps (a switch) of 0.25 s: 1.5 s
    ic = Interconnect(num_devices=8, topology="switch", link_bytes_per_s=3500.0,
                      links_per_device=2, latency_s=0.25, shape=(8,))
    return replace(load_target("h100"), interconnect=ic)


def test_independent_compute_hides_the_all_reduce() -> None:
    target = _target()
    plan = communication_plan(_program({"b": ("x",)}), [1.0, 0.0, 3.0, 1.0], target)
    (ar,) = plan.collectives
    assert (ar.start_s, ar.end_s, ar.time_s) == pytest.approx((1.0, 2.5, 1.5))
    assert ar.wire_bytes == pytest.approx(7000.0)
    # b runs 1..4 alongside the all-reduce (1..2.5); c starts at 4
    assert plan.step_time_s == pytest.approx(5.0)
    assert plan.compute_s == pytest.approx(5.0) and plan.exposed_comm_s == pytest.approx(0.0)
    assert ar.hidden_s == pytest.approx(1.5) and plan.overlap_fraction == pytest.approx(1.0)


def test_dependent_compute_waits_for_the_all_reduce() -> None:
    target = _target()
    plan = communication_plan(_program({"b": ("ar",)}), [1.0, 0.0, 3.0, 1.0], target)
    # a 0..1, all-reduce 1..2.5, b 2.5..5.5, c 5.5..6.5: 1.5 s of communication exposed
    assert plan.step_time_s == pytest.approx(6.5)
    assert plan.exposed_comm_s == pytest.approx(1.5) and plan.overlap_fraction == pytest.approx(0.0)
    assert plan.bytes_by_kind() == {"all_reduce": 4000}


def test_a_partitioned_program_needs_as_many_devices() -> None:
    program = _program({"b": ("x",)})
    with pytest.raises(ChoiceError, match="partitioned over 8 devices"):
        check_devices(program, load_target("h100"))
    check_devices(program, load_target("dgx-h100"))
    with pytest.raises(ChoiceError, match="tpu-v5e-8"):
        communication_plan(program, [0.0] * 4, load_target("cpu"))
