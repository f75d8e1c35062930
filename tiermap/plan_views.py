"""`tiermap.Plan`: the plan's data (tiermap/ir/plan.py) with the checks and views users call.

The IR keeps plans as plain data; verifying, reporting and annotating them needs the verifier,
the report and the MLIR layer, all above the IR. This class adds those verbs, and
`tiermap.plan`, `tiermap.jit(...).lower(...).plan()` and `tiermap.Plan.from_json` return it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tiermap.errors import TiermapError
from tiermap.frontend.annotate import annotate_mlir
from tiermap.ir import plan as plan_data
from tiermap.ir.decisions import Decision
from tiermap.ir.plan import annotations_for
from tiermap.passes.verify import verify_plan
from tiermap.report import plan_html, plan_report


@dataclasses.dataclass(frozen=True)
class Plan(plan_data.Plan):
    """A placement of a program on a target (see tiermap/ir/plan.py for its semantics), with
    `verify`, `report`, `annotated_mlir` and a notebook view."""

    @classmethod
    def of(cls, plan: plan_data.Plan) -> Plan:
        """The same plan as a `tiermap.Plan` (itself if it is one already)."""
        if isinstance(plan, cls):
            return plan
        return cls(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)})

    def verify(self) -> None:
        """Re-check the plan independently of the solver; raises PassError naming the fault."""
        verify_plan(self)

    def annotated_mlir(self) -> str:
        """The program's StableHLO with `tiermap.*` attributes on every op."""
        if self.program is None:
            raise TiermapError(
                "this plan has no program attached (it was read from JSON); "
                "fix: plan the program again with tiermap.plan(...)"
            )
        return annotate_mlir(self.program, annotations_for(self))

    def report(self, decisions: Sequence[Decision] | None = None,
               compiled_memory: str | None = None) -> str:
        """A text table: per-tier peak occupancy, traffic and time; the costliest tensors; with
        `decisions` (default: `Plan.decisions`), what the applied program realises of the plan;
        with `compiled_memory` (`tiermap.jit(f).lower(*args).memory_check().describe()`), the
        plan's peak device memory against XLA's."""
        return plan_report(self, decisions=decisions, compiled_memory=compiled_memory)

    def _repr_html_(self) -> str:
        return plan_html(self)
