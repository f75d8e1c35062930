"""The `schedule` pass: fixes the order in which ops run.

tiermap keeps the frontend's order: the order of the ops in the StableHLO module, which is the
order JAX traced them in (XLA's own scheduler may reorder; tiermap plans the program as written,
so the placement can be checked against the module step by step). The pass re-checks that this
order is topological: every op reads only program inputs and values produced at earlier steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from tiermap.errors import PassError
from tiermap.ir.program import Program
from tiermap.passes.base import PipelineState, Schedule


def check_topological(program: Program, op_ids: Sequence[str], pass_name: str) -> None:
    """Raise PassError unless `op_ids` lists every op once, each after its inputs' producers."""
    if len(op_ids) != len(program.ops) or len(set(op_ids)) != len(op_ids):
        raise PassError(pass_name, f"schedule lists {len(op_ids)} op ids for "
                                   f"{len(program.ops)} ops (each op must appear once)")
    position = {op_id: i for i, op_id in enumerate(op_ids)}
    for op in program.ops:
        if op.id not in position:
            raise PassError(pass_name, f"op {op.id} is missing from the schedule")
        here = position[op.id]
        for vid in op.inputs:
            producer = program.values[vid].producer_step
            if producer >= 0 and position[program.ops[producer].id] >= here:
                raise PassError(
                    pass_name,
                    f"op {op.id} at step {here} reads {vid}, produced by "
                    f"{program.ops[producer].id} at step {position[program.ops[producer].id]}: "
                    "not a topological order")


@dataclass(frozen=True)
class SchedulePass:
    """Keep the frontend's op order. Requires a program; ensures `state.schedule`."""

    name: ClassVar[str] = "schedule"

    def run(self, state: PipelineState) -> PipelineState:
        program = state.program
        op_ids = tuple(op.id for op in program.ops)
        check_topological(program, op_ids, self.name)
        return replace(state, schedule=Schedule(op_ids))
