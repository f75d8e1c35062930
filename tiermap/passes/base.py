"""The pass protocol and the immutable pipeline state (the pass manager is in manager.py).

A pass is a frozen dataclass: `name` (kebab-case, the snake_case of its file name), its options as
fields, and `run(state) -> state` returning a new `PipelineState` (built with
`dataclasses.replace`). The `PassManager` (manager.py) runs passes in order, re-checks the state
after each one (IR and analysis invariants; the independent plan verifier once a plan exists),
records each pass's wall time and wraps unexpected failures in `PassError(pass_name, message)`.
Errors the user must see as they are (`InfeasiblePlacementError`, `HardwareSpecError`, any other
`TiermapError`) pass through unchanged.

Deadline: `PipelineState.deadline_s` (a `time.perf_counter()` value, set by `plan()` to the moment
its `time_limit_s` runs out) is when planning should be done. Passes that search (`fuse`,
`place-tiers`) fit their solver time limits into what is left before it, keeping a reserve for the
work after them; passes that do not search ignore it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from tiermap.hardware.target import Target
from tiermap.ir.fusion import Fusion
from tiermap.ir.plan import Plan
from tiermap.ir.program import Program
from tiermap.ir.untaken import Untaken

# --- analysis results the state carries (plain data; the passes that compute them are in
# schedule.py and liveness.py) ---


@dataclass(frozen=True)
class Schedule:
    """The op order: `op_ids[i]` runs at step i."""

    op_ids: tuple[str, ...]


@dataclass(frozen=True)
class Liveness:
    """Live ranges and accesses of the program's tensors.

    Attributes:
        ranges: value id → (first step, last step), inclusive.
        accesses: value id → the steps that write (producer) or read it, ascending.
        live_bytes: bytes live at each step (a tuple of length num_steps).
    """

    ranges: Mapping[str, tuple[int, int]]
    accesses: Mapping[str, tuple[int, ...]]
    live_bytes: tuple[int, ...]

    @property
    def peak_live_bytes(self) -> int:
        return max(self.live_bytes, default=0)


# --- the state and the protocol ---


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
        untaken: decisions the passes must not make because the applied program does not
            realise them (tiermap/ir/untaken.py; fusion, recompute and placement honour it).
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
    untaken: Untaken = field(default_factory=Untaken)

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
