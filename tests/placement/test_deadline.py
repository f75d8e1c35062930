"""The planning deadline: `plan`'s time limit bounds the passes after lowering as a wall-clock
guard behind the solvers' deterministic work limits; the MIP's guard is what is left, a guard
that decides anything is a warning in the plan, and a plan always comes back, verified."""

from __future__ import annotations

import time
from dataclasses import replace

from tests.passes.helpers import MIB, program, two_tier
from tiermap.fusion.fuse import FusePass
from tiermap.ir.fusion import Fusion
from tiermap.ir.program import Program
from tiermap.passes.base import PipelineState
from tiermap.passes.liveness import LivenessPass
from tiermap.passes.manager import PassManager
from tiermap.passes.schedule import SchedulePass
from tiermap.passes.verify import verify_plan
from tiermap.pipeline import plan
from tiermap.placement.baselines import greedy_assignment
from tiermap.placement.mip import solve_mip
from tiermap.placement.place_tiers import PlaceTiersPass

# Time a pass may take beyond its limit on a small program: one window's model and solve
from tiermap.placement.problem import PlacementProblem

# Time a pass may take beyond its limit on a small program: one window's model and solve
# overrun, the plan's build and verification (generous: the test machine is shared).
OVERHEAD_S = 1.5


def _forward_backward(layers: int) -> Program:
    """A forward pass keeping every activation (1 MiB each) for a backward pass that reads
    them in reverse: with a fast tier of a few MiB, activations must be evicted and prefetched,
    so the MIP has many decisions and, with small windows, many windows."""
    sizes = {"x": MIB}
    ops: list[tuple[list[str], list[str], float]] = []
    prev = "x"
    for i in range(layers):
        sizes[f"a{i}"] = MIB
        ops.append(([prev], [f"a{i}"], 1e6))
        prev = f"a{i}"
    grad = prev
    for i in reversed(range(layers)):
        sizes[f"g{i}"] = MIB
        ops.append(([grad, f"a{i}"], [f"g{i}"], 1e6))
        grad = f"g{i}"
    return program(sizes, ["x"], ops, [grad], name="forward-backward")


def _placed_state(prog: Program, deadline_s: float | None) -> PipelineState:
    state = PassManager([SchedulePass(), LivenessPass()]).run(
        PipelineState(prog, two_tier(4 * MIB), Fusion(), "time"))
    return replace(state, deadline_s=deadline_s)


def test_the_deadline_guards_the_mip_and_the_plan_warns_when_it_decides() -> None:
    prog = _forward_backward(40)
    state = _placed_state(prog, time.perf_counter() + 1.0)
    t0 = time.perf_counter()
    out = PlaceTiersPass(time_limit_s=30.0, max_window_binaries=60).run(state)
    wall_s = time.perf_counter() - t0
    assert out.plan is not None
    info = out.plan.solver
    assert info.time_limit_s == 30.0  # the configured guard: the JSON must not depend on timing
    assert info.wall_s <= 1.0 + OVERHEAD_S
    assert wall_s <= 1.0 + OVERHEAD_S
    if info.status == "greedy_fallback" or "guard" in info.detail:
        assert out.plan.warnings, "a deadline that decided the plan must be a warning"
    assert info.status in ("feasible", "greedy_fallback")  # decomposed: never "optimal"
    assert out.plan.predicted_time_s <= out.plan.baselines["greedy"] * (1 + 1e-9)
    verify_plan(out.plan, prog)


def test_no_time_left_skips_the_mip_and_returns_the_greedy_plan() -> None:
    prog = _forward_backward(12)
    state = _placed_state(prog, time.perf_counter() - 1.0)  # already past
    out = PlaceTiersPass(time_limit_s=30.0).run(state)
    assert out.plan is not None
    info = out.plan.solver
    assert info.status == "greedy_fallback"
    assert info.time_limit_s == 30.0
    assert out.plan.strategy == "mip"
    assert len(out.plan.warnings) == 2  # no re-spreading of greedy's transfers, no MIP
    assert "too little for the MIP" in out.plan.warnings[1]
    assert out.plan.predicted_time_s == out.plan.baselines["greedy"]
    assert any("no MIP solution" in n for n in out.plan.notes)
    verify_plan(out.plan, prog)


def test_without_a_deadline_the_pass_keeps_its_own_limit() -> None:
    prog = _forward_backward(6)
    out = PlaceTiersPass(time_limit_s=7.0).run(_placed_state(prog, None))
    assert out.plan is not None and out.plan.solver.time_limit_s == 7.0


def test_plan_returns_within_its_time_limit() -> None:
    prog = _forward_backward(40)
    t0 = time.perf_counter()
    p = plan(prog, target=two_tier(4 * MIB), time_limit_s=1.0, fusion=False)
    wall_s = time.perf_counter() - t0
    assert wall_s <= 1.0 + OVERHEAD_S
    assert p.solver.time_limit_s == 1.0
    assert p.solver.status in ("optimal", "feasible", "greedy_fallback")
    if p.solver.status == "optimal":
        assert p.solver.gap is not None and p.solver.gap <= 1e-3
    verify_plan(p, prog)


def test_fusion_limit_fits_the_deadline() -> None:
    prog = _forward_backward(4)
    state = PipelineState(prog, two_tier(4 * MIB))
    fuse = FusePass(time_limit_s=10.0)
    assert fuse.solver_time_limit_s(state) == 10.0
    assert fuse.solver_time_limit_s(replace(state, deadline_s=time.perf_counter() + 2.0)) <= 1.0
    assert fuse.solver_time_limit_s(replace(state, deadline_s=time.perf_counter() - 5.0)) > 0.0


def test_a_mip_cut_short_by_its_guard_warns_that_its_plan_depends_on_timing() -> None:
    """Windows skipped once the guard is spent (or solves stopped by it) make the plan depend on
    the machine's speed: the outcome's warnings say so. One that finishes has none."""
    prog = _forward_backward(40)
    problem = PlacementProblem(prog, two_tier(4 * MIB), pin=False)
    greedy = greedy_assignment(problem)
    # the first window is always solved; with no time left after it, the others are skipped
    cut = solve_mip(problem, greedy, 1e-6, seed=0, backend="highs", workers=1,
                    max_window_binaries=60)
    assert cut.status == "feasible"
    assert len(cut.warnings) == 1 and "wall-clock guard" in cut.warnings[0]
    # a small program is one window, solved in milliseconds (its limit is 0.05 s at least)
    small = PlacementProblem(_forward_backward(4), two_tier(4 * MIB), pin=False)
    done = solve_mip(small, greedy_assignment(small), 60.0, seed=0, backend="highs", workers=1)
    assert done.status == "optimal"
    assert done.warnings == ()
