"""The pass protocol and manager: order, timing, verification and error wrapping."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import pytest

from tests.passes.helpers import MIB, program, two_tier
from tiermap.errors import InfeasiblePlacementError, PassError
from tiermap.ir.program import Op, Program
from tiermap.passes.base import Liveness, Pass, PipelineState
from tiermap.passes.liveness import LivenessPass, compute_liveness
from tiermap.passes.manager import PassManager
from tiermap.passes.schedule import SchedulePass
from tiermap.passes.verify import VerifyPass
from tiermap.placement.place_tiers import PlaceTiersPass


def _chain() -> Program:
    return program({"a": MIB, "b": MIB, "c": 4}, ["a"], [(["a"], ["b"], 0.0),
                                                          (["b"], ["c"], 1e6)], ["c"])


@dataclass(frozen=True)
class Boom:
    name: ClassVar[str] = "boom"

    def run(self, state: PipelineState) -> PipelineState:
        raise ValueError("the widget is missing")


@dataclass(frozen=True)
class Infeasible:
    name: ClassVar[str] = "infeasible"

    def run(self, state: PipelineState) -> PipelineState:
        raise InfeasiblePlacementError("tensor t9 does not fit")


@dataclass(frozen=True)
class BreakLiveness:
    name: ClassVar[str] = "break-liveness"

    def run(self, state: PipelineState) -> PipelineState:
        return replace(state, liveness=Liveness({}, {}, ()))


def _state() -> PipelineState:
    return PipelineState(_chain(), two_tier(4 * MIB))


def test_passes_are_frozen_dataclasses_with_kebab_case_names() -> None:
    for p in (SchedulePass(), LivenessPass(), PlaceTiersPass(), VerifyPass()):
        assert isinstance(p, Pass)
        assert p.name.replace("-", "_").isidentifier() and p.name == p.name.lower()
        with pytest.raises(AttributeError):
            p.name = "other"  # type: ignore[misc]


def test_manager_runs_in_order_and_times_every_pass() -> None:
    passes = [SchedulePass(), LivenessPass(), PlaceTiersPass(strategy="greedy"), VerifyPass()]
    state = PassManager(passes).run(_state())
    assert state.plan is not None
    assert state.schedule is not None and state.schedule.op_ids == ("op0", "op1")
    assert set(state.plan.pass_wall_s) >= {"schedule", "liveness", "place-tiers", "verify"}
    assert all(v >= 0 for v in state.plan.pass_wall_s.values())


def test_unexpected_failures_are_wrapped_naming_the_pass() -> None:
    with pytest.raises(PassError) as info:
        PassManager([SchedulePass(), Boom()]).run(_state())
    assert info.value.pass_name == "boom"
    assert "ValueError: the widget is missing" in str(info.value)


def test_errors_for_the_user_pass_through_unchanged() -> None:
    with pytest.raises(InfeasiblePlacementError, match="tensor t9"):
        PassManager([Infeasible()]).run(_state())


def test_state_is_verified_after_each_pass() -> None:
    with pytest.raises(PassError) as info:
        PassManager([SchedulePass(), BreakLiveness()]).run(_state())
    assert info.value.pass_name == "break-liveness"
    assert "liveness lacks values" in str(info.value)
    # without verification the broken state goes through
    PassManager([SchedulePass(), BreakLiveness()], verify_each=False).run(_state())


def test_manager_rejects_non_passes_and_repeated_names() -> None:
    with pytest.raises(TypeError):
        PassManager([object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="repeat"):
        PassManager([SchedulePass(), SchedulePass()])


def test_schedule_rejects_an_order_that_reads_before_writing() -> None:
    prog = _chain()
    swapped = replace(prog, ops=(replace(prog.ops[1], step=0, id="op0"),
                                 replace(prog.ops[0], step=1, id="op1")))
    with pytest.raises(PassError) as info:
        PassManager([SchedulePass()]).run(PipelineState(swapped, two_tier(4 * MIB)))
    assert info.value.pass_name == "schedule"
    assert "reads b" in str(info.value) and "not a topological order" in str(info.value)


def test_liveness_ranges_and_live_bytes() -> None:
    prog = _chain()
    live = compute_liveness(prog)
    assert live.ranges == {"a": (0, 0), "b": (0, 1), "c": (1, 1)}
    assert live.accesses == {"a": (0,), "b": (0, 1), "c": (1,)}
    assert live.live_bytes == (2 * MIB, MIB + 4)
    assert live.peak_live_bytes == 2 * MIB


def test_liveness_of_program_outputs_reaches_the_last_step() -> None:
    prog = program({"a": 8, "b": 8, "c": 8, "d": 8}, ["a"],
                   [(["a"], ["b"], 0.0), (["a"], ["c"], 0.0), (["c"], ["d"], 0.0)], ["b", "d"])
    live = compute_liveness(prog)
    assert live.ranges["b"] == (0, 2)  # an output lives to the end
    assert live.ranges["a"] == (0, 1)
    assert isinstance(prog.ops[0], Op)
