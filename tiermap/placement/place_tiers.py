"""The `place-tiers` pass: where every tensor lives at every step, by MIP (or a baseline).

The MIP is in mip.py and mip_model.py (its numbered formulation), the baselines in
baselines.py, the shared segment form in problem.py."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

from tiermap.bounds.capacity_lp import capacity_lower_bound
from tiermap.bounds.knapsack import program_lower_bound_s
from tiermap.costmodel.evaluate import evaluate
from tiermap.errors import ChoiceError, InfeasiblePlacementError, PassError
from tiermap.ir.fusion import Fusion
from tiermap.ir.plan import Plan, SolverInfo
from tiermap.options import (
    BACKENDS,
    DEFAULT_TIME_LIMIT_S,
    OBJECTIVES,
    STRATEGIES,
    check_choice,
    check_positive_int,
    check_time_limit_s,
    check_workers,
)
from tiermap.passes.base import PipelineState
from tiermap.placement.baselines import greedy_assignment, naive_assignment
from tiermap.placement.build import build_plan
from tiermap.placement.mip import (
    MipOutcome,
    solve_mip,
)
from tiermap.placement.mip_model import (
    CAPACITY_LP_TIME_LIMIT_S,
    MAX_SWEEPS,
    MAX_WINDOW_BINARIES,
    MIN_MIP_TIME_S,
    RESERVE_FRACTION,
    RESERVE_PER_PLAN_BUILD,
    RESERVE_S,
    SINGLE_WINDOW_NODE_LIMIT,
    default_workers,
    solver_workers,
)
from tiermap.placement.problem import PlacementProblem
from tiermap.placement.segments import Assignment

# --- the pass -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaceTiersPass:
    """Decide every tensor's tier at every step. Requires liveness; ensures `state.plan`.

    Attributes:
        strategy: "mip" (OR-tools, warm-started from greedy), "greedy" or "naive".
        time_limit_s: the MIP's wall-clock guard (all windows together). Its solves stop at
            deterministic work limits (tiermap/placement/mip_model.py, WINDOW_NODE_LIMIT), which
            decide the plan; the guard only stops them on a machine too slow or busy for those.
            With a deadline in the state (`PipelineState.deadline_s`) the guard is less when
            less is left: see `mip_time_limit_s`; with no time left the MIP is skipped (status
            "greedy_fallback"). Either is a warning in the plan. The plan's
            `SolverInfo.time_limit_s` is this configured guard.
        seed: the solver's random seed.
        backend: "highs", "scip" or "cpsat".
        workers: solver threads (None: `default_workers()`); HiGHS always runs one.
        max_window_binaries: decompose programs whose MIP has more binaries than this.
        max_sweeps: at most this many fix-and-optimise sweeps over a decomposed program (more
            may find a better plan, in more time: see MAX_SWEEPS).
        single_window_node_limit: the branch-and-bound nodes of a program that is one window
            (0: no MIP at all, greedy's placement with its transfers re-spread)
            (SINGLE_WINDOW_NODE_LIMIT; the enclosing program of loops gets fewer, see
            `pipeline.LOOP_ROUND_NODE_LIMIT`).
        capacity_bound: also solve the capacity LP (tiermap/bounds/capacity_lp.py) for a lower bound
            that holds tier capacities over time (15-50 s on a 4k-op program where a tier binds;
            off by default).
    """

    name: ClassVar[str] = "place-tiers"
    strategy: str = "mip"
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    seed: int = 0
    backend: str = "highs"
    workers: int | None = None
    max_window_binaries: int = MAX_WINDOW_BINARIES
    max_sweeps: int = MAX_SWEEPS
    single_window_node_limit: int = SINGLE_WINDOW_NODE_LIMIT
    capacity_bound: bool = False

    def __post_init__(self) -> None:
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("backend", self.backend, BACKENDS)
        check_time_limit_s(self.time_limit_s)
        check_workers(self.workers)
        check_positive_int("max_sweeps", self.max_sweeps)

    def run(self, state: PipelineState) -> PipelineState:
        if state.liveness is None:
            raise PassError(self.name, "needs liveness: run the 'liveness' pass first")
        check_choice("objective", state.objective, OBJECTIVES)
        program, target = state.program, state.target
        if state.objective == "energy":
            lacking = [t.name for t in target.residency_tiers if t.energy_pj_per_byte is None]
            if lacking:
                raise ChoiceError(
                    f"objective 'energy' needs energy_pj_per_byte on every residency tier; "
                    f"target '{target.name}' lacks it on {', '.join(lacking)}. Fix: add the "
                    "figures to the target file, or use objective='time'")
        lower_bound_s = program_lower_bound_s(program, target, state.fusion)
        bound_notes: tuple[str, ...] = ()
        bound_warnings: tuple[str, ...] = ()
        if self.capacity_bound:
            left_s = state.seconds_left()
            cap = capacity_lower_bound(
                program, target, state.fusion, seed=self.seed,
                time_limit_s=CAPACITY_LP_TIME_LIMIT_S if left_s is None else max(
                    min(CAPACITY_LP_TIME_LIMIT_S, left_s / 3), 0.1))
            if cap.guard_fired:
                bound_warnings = (f"place-tiers: the capacity LP stopped at its wall-clock "
                                  f"guard ({cap.status}), so the lower bound can differ on "
                                  "another machine",)
            if cap.bound_s is not None and cap.bound_s > lower_bound_s:
                bound_notes = (f"lower bound {cap.bound_s:.6g} s from the {cap.detail} "
                               f"(the per-step knapsack bound is {lower_bound_s:.6g} s)",)
                lower_bound_s = cap.bound_s
            else:
                bound_notes = (f"lower bound: the per-step knapsack ({lower_bound_s:.6g} s); "
                               f"the capacity LP gave no more ({cap.status}: {cap.detail})",)
        out = self._place(state, lower_bound_s)
        if (bound_notes or bound_warnings) and out.plan is not None:
            out = replace(out, plan=replace(out.plan, notes=out.plan.notes + bound_notes,
                                            warnings=bound_warnings + out.plan.warnings))
        return out

    def _place(self, state: PipelineState, lower_bound_s: float) -> PipelineState:
        program, target = state.program, state.target
        workers = self.workers or default_workers()
        # naive: no fusion, no pins
        t0 = time.perf_counter()
        baselines: dict[str, float] = {}
        naive: Assignment | None = None
        naive_problem: PlacementProblem | None = None
        try:  # unfused, the program may not fit where the fused one does: no naive baseline
            naive_problem = PlacementProblem(program, target, Fusion(), state.liveness,
                                             state.objective, pin=False,
                                             untaken=state.untaken)
            naive = naive_assignment(naive_problem)
        except InfeasiblePlacementError:
            if self.strategy == "naive":
                raise
        if naive is not None and naive_problem is not None:
            naive_parts = naive_problem.to_plan_parts(naive)
            naive_eval = evaluate(program, target, naive_parts[0], naive_parts[1], Fusion())
            baselines["naive"] = naive_eval.predicted_time_s
            if self.strategy == "naive":
                return replace(state, plan=build_plan(
                    program, target, "naive", naive_parts[0], naive_parts[1], Fusion(),
                    lower_bound_s, {}, SolverInfo(
                        "naive", "heuristic", None, time.perf_counter() - t0, None,
                        detail="main memory, spilling in program order")))
        problem = PlacementProblem(program, target, state.fusion, state.liveness,
                                   state.objective, pin=True, untaken=state.untaken)
        t0 = time.perf_counter()
        greedy = greedy_assignment(problem)
        greedy_parts = problem.to_plan_parts(greedy)
        greedy_wall_s = time.perf_counter() - t0
        greedy_info = SolverInfo("greedy", "heuristic", None, greedy_wall_s, None,
                                 detail="memory-space-assignment-style heuristic")
        notes = () if naive is not None else (
            "the naive strategy finds no placement (whole tensors in program order do not "
            "fit), so there is no naive baseline",)
        t1 = time.perf_counter()
        greedy_plan = build_plan(program, target, "greedy", greedy_parts[0], greedy_parts[1],
                                 state.fusion, lower_bound_s, baselines, greedy_info, notes)
        build_s = time.perf_counter() - t1
        if self.strategy == "greedy":
            return replace(state, plan=greedy_plan)
        baselines["greedy"] = greedy_plan.predicted_time_s
        return replace(state, plan=self._mip(state, problem, greedy, greedy_plan, naive_problem,
                                             naive, baselines, lower_bound_s, workers, build_s))

    def mip_time_limit_s(self, state: PipelineState, plan_build_s: float) -> float:
        """The MIP's time limit: `time_limit_s`, or less when the state has a deadline: what is
        left before it, less a reserve for the work after the MIP (building its plan, re-spreading
        its transfers and the independent verification), estimated as RESERVE_PER_PLAN_BUILD
        times the measured time of building the greedy plan, plus RESERVE_FRACTION of the limit."""
        left_s = state.seconds_left()
        if left_s is None:
            return float(self.time_limit_s)
        reserve_s = (RESERVE_PER_PLAN_BUILD * plan_build_s + RESERVE_S
                     + RESERVE_FRACTION * float(self.time_limit_s))
        return max(min(float(self.time_limit_s), left_s - reserve_s), 0.0)

    def _mip(self, state: PipelineState, problem: PlacementProblem, greedy: Assignment,
             greedy_plan: Plan, naive_problem: PlacementProblem | None,
             naive: Assignment | None,
             baselines: Mapping[str, float], lower_bound_s: float, workers: int,
             plan_build_s: float) -> Plan:
        program, target = state.program, state.target
        left_s = state.seconds_left()
        warnings: list[str] = []
        # greedy's placement with its transfers re-spread: the MIP's sweeps must beat it, and
        # it is returned when the MIP finds nothing or something slower (below)
        respread = None
        if greedy_plan.transfers:
            if left_s is None or left_s > 0.0:
                respread = problem.respread_parts(greedy)
            else:
                warnings.append("place-tiers: the planning deadline had passed before greedy's "
                                "transfers were re-spread, so this plan can differ on a faster "
                                "machine (a longer time limit avoids it)")
        spread_parts = None if respread is None else respread[:2]
        spread_s = greedy_plan.predicted_time_s if respread is None else respread[2]
        t0 = time.perf_counter()
        guard_s = self.mip_time_limit_s(state, plan_build_s)
        if self.single_window_node_limit == 0:
            # the planning rounds of a program with loops (pipeline.LOOP_ROUND_NODE_LIMIT)
            outcome = MipOutcome(None, "heuristic", None, None, None, 0,
                                 "no MIP for this program (node limit 0: the enclosing program "
                                 "of loops, whose bodies the MIP places)")
        elif guard_s >= MIN_MIP_TIME_S:
            outcome = solve_mip(problem, greedy, guard_s, self.seed, self.backend, workers,
                                self.max_window_binaries, self.max_sweeps, spread_s,
                                self.single_window_node_limit)
            warnings.extend(outcome.warnings)
        else:
            outcome = MipOutcome(None, "greedy_fallback", None, None, None, 0,
                                 "no time left for the MIP before the planning deadline")
            warnings.append(f"place-tiers: {guard_s:.3g} s were left of the planning deadline, "
                            "too little for the MIP, so the greedy plan is returned; it can "
                            "differ on a faster machine (a longer time limit avoids it)")
        wall_s = time.perf_counter() - t0
        notes: list[str] = list(greedy_plan.notes)
        info = SolverInfo(self.backend, outcome.status, outcome.gap, wall_s,
                          float(self.time_limit_s), seed=self.seed,
                          workers=solver_workers(self.backend, workers),
                          bound_s=outcome.bound_s, detail=outcome.detail)
        plan: Plan | None = None
        if outcome.assignment is not None:
            parts = problem.to_plan_parts(outcome.assignment, respread=True)
            plan = build_plan(program, target, "mip", parts[0], parts[1], state.fusion,
                              lower_bound_s, baselines, info)
            if not _no_worse(plan, greedy_plan, state.objective):
                notes.append(
                    f"the MIP's plan evaluates to {plan.predicted_time_s:.9g} s, worse than "
                    f"greedy's {greedy_plan.predicted_time_s:.9g} s; returning the greedy plan")
                info = replace(info, status="greedy_fallback",
                               detail=info.detail + "; the MIP plan was worse than greedy")
                plan = None
        else:
            notes.append(f"no MIP solution ({outcome.detail}); returning the greedy plan")
        if spread_parts is not None:
            # returned when the MIP found nothing, or found something slower (re-spreading
            # changes what each plan costs)
            spread = build_plan(program, target, "mip", spread_parts[0], spread_parts[1],
                                state.fusion, lower_bound_s, baselines, info)
            best = greedy_plan if plan is None else plan
            if spread.predicted_time_s < best.predicted_time_s * (1 - 1e-12) and (
                    _no_worse(spread, best, state.objective)):
                if plan is None:
                    notes.append("greedy's placement with its transfers re-spread")
                else:
                    notes.append(
                        f"greedy's placement with its transfers re-spread "
                        f"({spread.predicted_time_s:.9g} s) is faster than the MIP's plan "
                        f"({plan.predicted_time_s:.9g} s) after re-spreading; returning it")
                plan = spread
        if plan is None:
            plan = replace(greedy_plan, strategy="mip", baselines=dict(baselines), solver=info)
        fusion = state.fusion
        if (naive is not None and naive_problem is not None
                and plan.predicted_time_s > baselines["naive"] * (1 + 1e-12)):
            # Fusion made this program slower than the unfused naive plan: keep the naive one.
            parts = naive_problem.to_plan_parts(naive)
            notes.append("the fused plan is slower than the unfused naive plan; returning the "
                         "naive placement without fusion")
            info = replace(info, status="greedy_fallback",
                           detail=info.detail + "; naive (unfused) placement returned")
            fusion = Fusion()
            plan = build_plan(program, target, "mip", parts[0], parts[1], fusion,
                              lower_bound_s, baselines, info)
        if state.objective == "time" and (outcome.bound_s is None or info.status not in (
                "optimal", "feasible")):
            # decomposed or fallen back: measure the gap against the program's lower bound
            pred = plan.predicted_time_s
            info = replace(info, bound_s=plan.lower_bound_s,
                           gap=max(pred - plan.lower_bound_s, 0.0) / pred if pred > 0 else 0.0)
        return replace(plan, solver=info, notes=tuple(notes), warnings=tuple(warnings))


def _no_worse(plan: Plan, reference: Plan, objective: str) -> bool:
    tol = 1e-12
    if plan.predicted_time_s > reference.predicted_time_s * (1 + tol):
        return False
    if objective == "energy":
        e_plan = _energy_j(plan)
        e_ref = _energy_j(reference)
        return e_plan <= e_ref * (1 + tol) + 1e-300
    return True


def _energy_j(plan: Plan) -> float:
    energy = {t.name: t.energy_pj_per_byte or 0.0 for t in plan.target.tiers}
    return sum(b * energy[t] for t, b in plan.traffic_bytes.items()) * 1e-12
