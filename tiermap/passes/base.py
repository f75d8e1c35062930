"""The pass protocol, the immutable pipeline state and the pass manager.

A pass is a frozen dataclass: `name` (kebab-case, the snake_case of its file name), its options as
fields, and `run(state) -> state` returning a new `PipelineState` (built with
`dataclasses.replace`). The `PassManager` runs passes in order, re-checks the state after each one
(IR and analysis invariants; the independent plan verifier once a plan exists), records each
pass's wall time and wraps unexpected failures in `PassError(pass_name, message)`. Errors the user
must see as they are (`InfeasiblePlacementError`, `HardwareSpecError`, any other `TiermapError`)
pass through unchanged.

Deadline: `PipelineState.deadline_s` (a `time.perf_counter()` value, set by `plan()` to the moment
its `time_limit_s` runs out) is when planning should be done. Passes that search (`fuse`,
`place-tiers`) fit their solver time limits into what is left before it, keeping a reserve for the
work after them; passes that do not search ignore it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from tiermap.errors import PassError, TiermapError
from tiermap.hardware.target import Target
from tiermap.ir.fusion import Fusion
from tiermap.ir.plan import Plan
from tiermap.ir.program import Program

if TYPE_CHECKING:
    from tiermap.passes.liveness import Liveness
    from tiermap.passes.schedule import Schedule


@dataclass(frozen=True)
class PipelineState:
    """Everything the passes know about one program on one target. Immutable; passes replace it.

    Attributes:
        program: the program being planned (steps are the schedule order).
        target: the hardware target.
        fusion: fusion decisions (no fusion until a fusion pass runs).
        objective: what placement minimises: "time" (predicted seconds) or "energy".
        schedule: the op order, set by the `schedule` pass.
        liveness: live ranges and live bytes per step, set by the `liveness` pass.
        plan: the placement, set by the `place-tiers` pass.
        pass_wall_s: wall-clock seconds of each pass run so far (not deterministic).
        deadline_s: when planning should be done, as a `time.perf_counter()` value (None: no
            deadline; each pass keeps its own time limits). Set by `plan()`.
    """

    program: Program
    target: Target
    fusion: Fusion = field(default_factory=Fusion)
    objective: str = "time"
    schedule: Schedule | None = None
    liveness: Liveness | None = None
    plan: Plan | None = None
    pass_wall_s: Mapping[str, float] = field(default_factory=dict, compare=False)
    deadline_s: float | None = field(default=None, compare=False)

    def seconds_left(self) -> float | None:
        """Seconds until `deadline_s` (negative once past), or None without a deadline."""
        return None if self.deadline_s is None else self.deadline_s - time.perf_counter()


@runtime_checkable
class Pass(Protocol):
    """A compiler pass: a frozen dataclass with a kebab-case `name` and `run(state) -> state`."""

    name: ClassVar[str]

    def run(self, state: PipelineState) -> PipelineState:
        """Return a new state; never mutate `state`."""
        ...


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
        from tiermap.passes.schedule import check_topological

        check_topological(program, state.schedule.op_ids, after)
    if state.liveness is not None:
        from tiermap.passes.liveness import check_liveness

        check_liveness(program, state.liveness, after)
    if state.plan is not None and check_plan:
        from tiermap.passes.verify import verify_plan

        try:
            verify_plan(state.plan, program)
        except PassError as exc:
            raise PassError(after, f"plan does not verify: {exc}") from exc


def _is_verify(p: Pass) -> bool:
    from tiermap.passes.verify import VerifyPass

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
