"""How far the MIP's plan is from the optimum of its own placement model (the segment form).

    python benchmarks/placement_model_gap.py                 # sn40l, 12-layer training step
    python benchmarks/placement_model_gap.py --target h100 --whole-s 20 40

The default plan decomposes the program into fix-and-optimise windows. Here the whole program
is also solved as one model, warm-started from the windowed plan, for each time limit given:
its dual bound is a lower bound on every plan *in the segment form* (not on every plan: the
segment form is a restriction; `bounds.knapsack` and the capacity LP bound those). The LP
relaxation of that one model is printed too, with fixed windows and with window options.
Prints a markdown table for docs/benchmarks.md ("Placement").
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402

from tiermap.costmodel.evaluate import evaluate  # noqa: E402
from tiermap.frontend.lowering import lower  # noqa: E402
from tiermap.hardware.loader import load_target  # noqa: E402
from tiermap.ir.fusion import Fusion  # noqa: E402
from tiermap.passes.base import PipelineState  # noqa: E402
from tiermap.passes.liveness import LivenessPass  # noqa: E402
from tiermap.passes.manager import PassManager  # noqa: E402
from tiermap.passes.schedule import SchedulePass  # noqa: E402
from tiermap.pipeline import fusion_passes  # noqa: E402
from tiermap.placement import mip, mip_model  # noqa: E402
from tiermap.placement.baselines import greedy_assignment  # noqa: E402
from tiermap.placement.cost_state import CostState  # noqa: E402
from tiermap.placement.problem import PlacementProblem  # noqa: E402


def _lp_relaxation_s(problem: PlacementProblem, incumbent: dict, window_options: bool,
                     time_limit_s: float) -> tuple[float | None, float]:
    """The LP relaxation of the whole-program model (seconds of predicted time), and its wall."""
    from ortools.math_opt.python import mathopt as mo

    saved = mip_model.MIP_WINDOW_OPTIONS
    mip_model.MIP_WINDOW_OPTIONS = window_options
    try:
        state = CostState(problem, incumbent)
        free = mip._free_tensors(problem, 0, problem.num_steps - 1)
        for vid in free:
            state.remove(vid)
        model = mip_model._WindowModel(problem, state, incumbent, free, 0,
                                         problem.num_steps - 1, "highs", None)
    finally:
        mip_model.MIP_WINDOW_OPTIONS = saved
    proto = model.model.export_model()
    del proto.variables.integers[:]
    proto.variables.integers.extend([False] * len(model.var_lb))
    params = mo.SolveParameters(time_limit=timedelta(seconds=time_limit_s), random_seed=0)
    params.highs.int_options["threads"] = 1
    t0 = time.perf_counter()
    result = mo.solve(mo.Model.from_model_proto(proto), mo.SolverType.HIGHS, params=params)
    wall_s = time.perf_counter() - t0
    if result.termination.reason != mo.TerminationReason.OPTIMAL:
        return None, wall_s
    modelled = np.array(sorted(model.T), dtype=np.int64)
    rest_s = state.total_time_s() - float(state.step_times(modelled).sum())
    return result.objective_value() * model.time_unit_s + rest_s, wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="sn40l")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--window-s", type=float, default=20.0, help="the windowed MIP's limit")
    parser.add_argument("--whole-s", type=float, nargs="*", default=[20.0],
                        help="time limits of the whole-program solves")
    args = parser.parse_args()
    from tiermap.examples.models import transformer_train

    fn, fn_args = transformer_train(layers=args.layers)
    target = load_target(args.target)
    program = lower(fn, *fn_args, platform=target.platform)
    state = PassManager([SchedulePass(), LivenessPass()] + fusion_passes(10.0, 0, 1)).run(
        PipelineState(program, target, Fusion(), "time"))
    p = PlacementProblem(state.program, state.target, state.fusion, state.liveness, "time")
    greedy = greedy_assignment(p)

    def respread_ms(assignment: dict) -> float:
        parts = p.to_plan_parts(assignment, respread=True)
        return 1e3 * evaluate(p.program, p.target, parts[0], parts[1],
                              p.fusion).predicted_time_s

    print(f"transformer_train_{args.layers}l on {args.target}: {p.num_steps} steps\n")
    print("| solve | limit s | wall s | model ms | after re-spreading ms | dual bound ms | gap |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| greedy | | | {1e3 * CostState(p, greedy).total_time_s():.4f} | "
          f"{respread_ms(greedy):.4f} | | |")
    t0 = time.perf_counter()
    windowed = mip.solve_mip(p, greedy, args.window_s, 0, "highs", 1)
    assert windowed.assignment is not None and windowed.objective is not None
    print(f"| windowed (default) | {args.window_s:g} | {time.perf_counter() - t0:.1f} | "
          f"{1e3 * windowed.objective:.4f} | {respread_ms(windowed.assignment):.4f} | | |")
    # one window: SINGLE_WINDOW_NODE_LIMIT nodes, the limit as its wall-clock guard
    for limit_s in args.whole_s:
        t0 = time.perf_counter()
        whole = mip.solve_mip(p, windowed.assignment, limit_s, 0, "highs", 1,
                              max_window_binaries=10**9)
        wall_s = time.perf_counter() - t0
        assert whole.assignment is not None and whole.objective is not None
        bound = "" if whole.bound_s is None else f"{1e3 * whole.bound_s:.4f}"
        gap = "" if whole.gap is None else f"{100 * whole.gap:.2f}%"
        print(f"| whole program, from windowed | {limit_s:g} | {wall_s:.1f} | "
              f"{1e3 * whole.objective:.4f} | {respread_ms(whole.assignment):.4f} | {bound} "
              f"| {gap} |")
    for options in (False, True):
        value_s, wall_s = _lp_relaxation_s(p, windowed.assignment, options, 300.0)
        label = "LP relaxation" + (", window options" if options else "")
        shown = "not solved" if value_s is None else f"{1e3 * value_s:.4f}"
        print(f"| {label} | 300 | {wall_s:.1f} | | | {shown} | |")


if __name__ == "__main__":
    main()
