"""The `liveness` pass: live ranges of every tensor and the live bytes at every step.

A tensor produced at step p occupies memory from p to its last use; a program input from step 0;
a program output to the last step. `Liveness.live_bytes` is the sum of the sizes of the tensors
live at each step, fusion ignored (a fused intermediate never reaches memory, so the placement
pass subtracts those itself).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from tiermap.errors import PassError
from tiermap.ir.program import Program
from tiermap.passes.base import Liveness, PipelineState


def compute_liveness(program: Program) -> Liveness:
    """Live ranges, access steps and live bytes per step of `program`."""
    n = program.num_steps
    ranges: dict[str, tuple[int, int]] = {}
    accesses: dict[str, tuple[int, ...]] = {}
    delta = np.zeros(n + 1, dtype=np.int64)
    consumers = program.consumers
    for vid, value in program.values.items():
        first, last = program.live_range(vid)
        ranges[vid] = (first, last)
        steps = list(consumers[vid])
        if value.producer_step >= 0:
            steps.insert(0, value.producer_step)
        accesses[vid] = tuple(sorted(set(steps)))
        if n:
            delta[first] += value.nbytes
            delta[last + 1] -= value.nbytes
    live = np.cumsum(delta[:n]) if n else np.zeros(0, dtype=np.int64)
    return Liveness(ranges, accesses, tuple(int(x) for x in live))


def check_liveness(program: Program, liveness: Liveness, pass_name: str) -> None:
    """Raise PassError if `liveness` does not describe `program` (every value, valid ranges)."""
    if set(liveness.ranges) != set(program.values):
        missing = sorted(set(program.values) - set(liveness.ranges))[:5]
        raise PassError(pass_name, f"liveness lacks values {missing} (or lists unknown ones)")
    if len(liveness.live_bytes) != program.num_steps:
        raise PassError(pass_name, f"liveness has {len(liveness.live_bytes)} steps, the program "
                                   f"{program.num_steps}")
    for vid, (first, last) in liveness.ranges.items():
        if program.num_steps and not 0 <= first <= last < program.num_steps:
            raise PassError(pass_name, f"tensor {vid} has live range [{first}, {last}] outside "
                                       f"steps 0..{program.num_steps - 1}")
        for step in liveness.accesses[vid]:
            if not first <= step <= last:
                raise PassError(pass_name, f"tensor {vid} is accessed at step {step} outside its "
                                           f"live range [{first}, {last}]")


@dataclass(frozen=True)
class LivenessPass:
    """Compute live ranges. Requires a schedule; ensures `state.liveness`."""

    name: ClassVar[str] = "liveness"

    def run(self, state: PipelineState) -> PipelineState:
        if state.schedule is None:
            raise PassError(self.name, "needs a schedule: run the 'schedule' pass first")
        return replace(state, liveness=compute_liveness(state.program))
