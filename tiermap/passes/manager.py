"""The pass manager: runs passes in order, re-checks the state after each, times each.

It sits above the passes whose invariants it checks (schedule, liveness, the verifier); the
passes themselves depend only on base.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from tiermap.errors import PassError, TiermapError
from tiermap.passes.base import Pass, PipelineState
from tiermap.passes.liveness import check_liveness
from tiermap.passes.schedule import check_topological
from tiermap.passes.verify import VerifyPass, verify_plan


def check_state(state: PipelineState, after: str, check_plan: bool = True) -> None:
    """Re-check the state's invariants after pass `after`; raises PassError naming the fault.

    Checks: op steps equal their positions, every op reads defined values, the schedule (when
    set) is a topological order of all ops, liveness (when set) matches the program, and the plan
    (when set and `check_plan`) passes the independent verifier.
    """
    program = state.program
    for index, op in enumerate(program.ops):
        if op.step != index:
            raise PassError(after, f"op {op.id} has step {op.step} at position {index}")
        for vid in op.inputs:
            if vid not in program.values:
                raise PassError(after, f"op {op.id} (step {index}) reads undefined value {vid}")
    if state.schedule is not None:
        check_topological(program, state.schedule.op_ids, after)
    if state.liveness is not None:
        check_liveness(program, state.liveness, after)
    if state.plan is not None and check_plan:
        try:
            verify_plan(state.plan, program)
        except PassError as exc:
            raise PassError(after, f"plan does not verify: {exc}") from exc


def _is_verify(p: Pass) -> bool:
    return isinstance(p, VerifyPass)


class PassManager:
    """Runs passes in order, verifying after each and timing each.

    A plan is immutable, so it is verified once: after the pass that made it, or, when the next
    pass is the `verify` pass (which re-checks the plan itself), by that pass alone.

    Args:
        passes: the passes, in the order they run.
        verify_each: re-check the state after every pass (default True).
    """

    def __init__(self, passes: Sequence[Pass], verify_each: bool = True) -> None:
        for p in passes:
            if not isinstance(p, Pass):
                raise TypeError(f"{p!r} is not a Pass (needs a `name` and `run(state)`)")
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"pass names repeat in the pipeline: {names}")
        self.passes = tuple(passes)
        self.verify_each = verify_each

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.passes)

    def run(self, state: PipelineState) -> PipelineState:
        """Run every pass on `state`; the returned state's plan carries `pass_wall_s`."""
        wall_s: dict[str, float] = dict(state.pass_wall_s)
        for i, p in enumerate(self.passes):
            t0 = time.perf_counter()
            try:
                new_state = p.run(state)
            except TiermapError:
                raise
            except Exception as exc:
                raise PassError(p.name, f"{type(exc).__name__}: {exc}") from exc
            if not isinstance(new_state, PipelineState):
                raise PassError(p.name, f"returned {type(new_state).__name__}, not PipelineState")
            wall_s[p.name] = time.perf_counter() - t0
            if self.verify_each:
                t1 = time.perf_counter()
                try:
                    # A plan is immutable: verify it only after the pass that made it, and
                    # leave it to the verify pass when that comes next.
                    verify_next = i + 1 < len(self.passes) and _is_verify(self.passes[i + 1])
                    check_state(new_state, p.name, check_plan=(
                        new_state.plan is not state.plan and not verify_next))
                except TiermapError:
                    raise
                except Exception as exc:
                    raise PassError(p.name, f"state check: {type(exc).__name__}: {exc}") from exc
                wall_s["verify-each"] = wall_s.get("verify-each", 0.0) + time.perf_counter() - t1
            state = replace(new_state, pass_wall_s=dict(wall_s))
        if state.plan is not None:
            state = replace(state, plan=replace(state.plan, pass_wall_s=dict(wall_s)))
        return state
