"""The `recompute` pass: drop stored tensors over idle spans where device memory is short, and
compute them again before their next read (select.py chooses, transform.py rewrites).

Runs after fusion (it needs to know what is stored) and before placement. When it recomputes
anything, the rewritten program goes through schedule, liveness and the fusion passes again
(`refuse`), so the repeated ops fuse like any others, then on to placement, which decides the
moves of what is left. Modes: "auto" (recompute where it pays against offloading to a host tier),
"fit" (recompute whatever is needed to fit device memory, offload not weighed), "off" (skip).
Programs with loops are not rewritten yet (a loop plan names its ops by step); the note says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from tiermap.options import check_recompute_mode
from tiermap.passes.base import Pass, PipelineState
from tiermap.passes.liveness import compute_liveness
from tiermap.recompute.select import describe, device_tiers, select
from tiermap.recompute.transform import rewrite

# The selection's wall-clock guard (its node limit decides the result): at most GUARD_S, and
# at most GUARD_SHARE of the time left before the planning deadline. Measured 2026-12-08 on
# GPT-12 (d 1024, batch 16, f32) on h100-4g, this 2-core VM idle: the "auto" selection (403
# candidates, 580 offload gaps) takes 11.4 s to its node limit, where the guard was 0.2 of the
# 28 s left (5.7 s) and fired (the plan then warned that another machine may choose otherwise).
GUARD_S = 30.0
GUARD_SHARE = 0.5


@dataclass(frozen=True)
class RecomputePass:
    """Options: `mode` (module docstring), `seed`, and `refuse`: the passes that re-plan the
    rewritten program's schedule, liveness and fusion."""

    name: ClassVar[str] = "recompute"
    mode: str = "auto"
    seed: int = 0
    refuse: Sequence[Pass] = ()

    def run(self, state: PipelineState) -> PipelineState:
        check_recompute_mode(self.mode)
        program = state.program
        if self.mode == "off":
            return state
        if any(op.kind == "stablehlo.while" for op in program.ops) or program.paired_attention:
            live = state.liveness or compute_liveness(program)
            dev, _host = device_tiers(state.target)
            cap = sum(state.target.tiers[i].capacity_bytes for i in dev)
            if live.peak_live_bytes <= cap:
                return state
            return self._note(state, "recompute: not tried (the program has loops, whose plans "
                                     "name their ops by step)")
        live = state.liveness or compute_liveness(program)
        left = state.seconds_left()
        guard = GUARD_S if left is None else max(min(GUARD_S, GUARD_SHARE * left), 0.5)
        sel = select(program, state.target, state.fusion, live, self.mode, guard, self.seed,
                     state.untaken)
        warnings = (("recompute: the selection MIP stopped at its wall-clock guard; another "
                     "machine may choose otherwise",) if sel.guard_fired else ())
        if not sel.chosen:
            return self._note(state, f"recompute: none ({sel.detail})", warnings=warnings)
        lines = [f"recompute: {len(sel.chosen)} tensor(s), "
                 f"{sum(c.nbytes for c in sel.chosen) / 2**20:.1f} MiB dropped ({sel.detail}"
                 + (f"; {sel.over_bytes / 2**20:.3g} MiB still over device memory at the "
                    "fullest step, left to placement" if sel.over_bytes else "") + ")"]
        lines += [f"recompute: {describe(c, program)}" for c in sel.chosen]
        new = replace(state, program=rewrite(program, sel.chosen), fusion=type(state.fusion)(),
                      schedule=None, liveness=None, plan=None)
        for p in self.refuse:
            new = p.run(new)
        return self._note(new, *lines, warnings=warnings)

    @staticmethod
    def _note(state: PipelineState, *lines: str, warnings: Sequence[str] = ()) -> PipelineState:
        fusion = replace(state.fusion, notes=tuple(state.fusion.notes) + tuple(lines),
                         warnings=tuple(state.fusion.warnings) + tuple(warnings))
        return replace(state, fusion=fusion)
