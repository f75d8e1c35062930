"""The placement MIP over the whole program: windows, fix-and-optimise sweeps, the outcome
(the model of one window and its numbered formulation are in mip_model.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tiermap.errors import PassError
from tiermap.mathopt import WorkBudget, guard_fired, load_mathopt
from tiermap.placement.cost_state import CostState
from tiermap.placement.mip_model import (
    CPSAT_DETERMINISTIC_TIME_PER_BINARY,
    CPSAT_MIN_DETERMINISTIC_TIME,
    MAX_SWEEPS,
    MAX_WINDOW_BINARIES,
    RELATIVE_GAP,
    SINGLE_WINDOW_NODE_LIMIT,
    SWEEP_MIN_GAIN,
    WINDOW_NODE_LIMIT,
    WINDOW_RELATIVE_GAP,
    _WindowModel,
)
from tiermap.placement.problem import PlacementProblem
from tiermap.placement.segments import Assignment, Choice


@dataclass(frozen=True)
class MipOutcome:
    """What the MIP found: an assignment (None if no solve returned one) and how it went."""

    assignment: Assignment | None
    status: str
    gap: float | None
    bound_s: float | None
    objective: float | None
    num_windows: int
    detail: str
    warnings: tuple[str, ...] = ()  # the wall-clock guard fired: the plan may depend on timing


def _binaries_per_step(problem: PlacementProblem) -> np.ndarray:
    """Binary variables whose decision (run, gap) starts at each step (free tensors only)."""
    per_step = np.zeros(problem.num_steps + 1)
    for vid, seg in problem.segments.items():
        if vid in problem.pinned:
            continue
        width = len(seg.tiers) + len(seg.homes)
        for run in seg.runs:
            per_step[run.lo] += width
        for gap in seg.gaps:
            per_step[gap.lo] += width
    return per_step


def window_bounds(problem: PlacementProblem, max_binaries: int) -> list[tuple[int, int]]:
    """Split the steps into windows of about `max_binaries` binaries each, cutting where fewest
    runs and fused kernels span the cut (near the ideal position)."""
    n = problem.num_steps
    per_step = _binaries_per_step(problem)
    total = float(per_step.sum())
    if total <= max_binaries or n < 8:
        return [(0, n - 1)] if n else []
    span = np.zeros(n + 1)  # what spans the cut before step s
    for vid, seg in problem.segments.items():
        if vid in problem.pinned:
            continue
        for run in seg.runs:
            if run.hi > run.lo:
                span[run.lo + 1] += 1.0
                span[run.hi + 1] -= 1.0
    for k in problem.kernels:
        if len(k.steps) > 1:
            span[k.steps[0] + 1] += 4.0
            span[k.steps[-1] + 1] -= 4.0
    badness = np.cumsum(span)
    num_windows = int(math.ceil(total / max_binaries))
    target = total / num_windows
    cum = np.cumsum(per_step[:n])
    cuts = [0]
    radius = max(4, n // (4 * num_windows))
    for i in range(1, num_windows):
        ideal = int(np.searchsorted(cum, i * target))
        lo, hi = max(cuts[-1] + 2, ideal - radius), min(n - 2, ideal + radius)
        if lo > hi:
            continue
        pos = np.arange(lo, hi + 1)
        score = badness[lo:hi + 1] + np.abs(pos - ideal) / (radius + 1)
        cuts.append(int(pos[int(np.argmin(score))]))
    cuts.append(n)
    return [(a, b - 1) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _free_tensors(problem: PlacementProblem, c0: int, c1: int) -> list[str]:
    """Tensors with a decision (home, run or gap) that starts in steps [c0, c1]."""
    out = []
    for vid, seg in problem.segments.items():
        if vid in problem.pinned:
            continue
        if (seg.homes and c0 <= seg.first <= c1) or any(c0 <= r.lo <= c1 for r in seg.runs) or (
                any(c0 <= g.lo <= c1 for g in seg.gaps)):
            out.append(vid)
    return out


@dataclass(frozen=True)
class _WindowResult:
    status: str  # optimal | feasible | a termination reason without a solution
    gap: float | None  # within the window, the rest fixed
    bound_s: float | None  # the whole program's time bound, valid only with the rest fixed
    solved: bool
    guard_fired: bool = False  # stopped by the wall-clock guard (the result depends on timing)


def _solve_window(p: PlacementProblem, state: CostState, assignment: Assignment,
                  free: Sequence[str], c0: int, c1: int, backend: str, budget: WorkBudget,
                  seed: int, workers: int, label: str, relative_gap: float) -> _WindowResult:
    """Free `free`'s decisions in [c0, c1], solve, keep the result if it is no worse.

    Updates `state` and `assignment` in place.
    """
    mathopt = load_mathopt()

    before = state.objective_value()
    step_s_before = state.step_times(np.arange(p.num_steps)) if (
        p.objective == "energy") else None
    for vid in free:
        state.remove(vid)
    model = _WindowModel(p, state, assignment, free, c0, c1, backend, step_s_before)
    try:
        result = model.solve(backend, budget, seed, workers, relative_gap)
    except Exception as exc:  # the solver refused the model or crashed
        for vid in free:
            state.add(vid, assignment[vid])
        cause = exc.__context__ if exc.__context__ is not None else exc
        raise PassError("place-tiers", f"{backend} failed on {label} (steps {c0}..{c1}): "
                        f"{type(cause).__name__}: {cause}") from exc
    reason = result.termination.reason
    solved = result.has_primal_feasible_solution()
    new: dict[str, Choice] = {}
    if solved:
        values = np.zeros(len(model.var_lb))
        for var, value in result.variable_values().items():
            values[var.id] = value
        for vid in free:
            old = assignment[vid]
            runs = tuple(_argmax(model.x[(vid, r)], values) if (vid, r) in model.x else k
                         for r, k in enumerate(old.runs))
            gaps = tuple(_argmax(model.z[(vid, g)], values) if (vid, g) in model.z else k
                         for g, k in enumerate(old.gaps))
            home = old.home
            if vid in model.h:
                on = [k for k, v in model.h[vid].items() if values[v] > 0.5]
                home = on[0] if on else None
            seg = p.segments[vid]
            ev, pf = list(old.evict_opt), list(old.prefetch_opt)
            for g, gap in enumerate(seg.gaps):
                if gap.prev_run is not None:
                    ev[g] = _chosen_window(model, vid, g, True, (runs[gap.prev_run], gaps[g]),
                                           (old.runs[gap.prev_run], old.gaps[g]), values, ev[g])
                if gap.next_run is not None:
                    pf[g] = _chosen_window(model, vid, g, False, (gaps[g], runs[gap.next_run]),
                                           (old.gaps[g], old.runs[gap.next_run]), values, pf[g])
            choice = Choice(runs, gaps, home, tuple(ev), tuple(pf))
            new[vid] = choice if p.valid(seg, choice) else old
        if not p.ties_hold({**assignment, **new}):
            new = {}  # (C8) holds in the model: only a tolerance can break it; keep the old
    for vid in free:
        state.add(vid, new.get(vid, assignment[vid]))
    if new and (state.objective_value() > before * (1 + 1e-12) + 1e-300
                or not state.within_capacity()):
        # the model is exact, so this is float noise or solver tolerance at most: keep the old
        for vid in free:
            state.remove(vid)
            state.add(vid, assignment[vid])
    else:
        assignment.update(state.assignment_of(free))
    status = "optimal" if reason == mathopt.TerminationReason.OPTIMAL else (
        "feasible" if solved else reason.name.lower())
    rel_gap = bound_s = None
    if solved:
        bounds = result.termination.objective_bounds
        primal = result.objective_value()
        if math.isfinite(bounds.dual_bound) and primal > 0:
            rel_gap = max(primal - bounds.dual_bound, 0.0) / abs(primal)
            if p.objective == "time":
                modelled = np.array(sorted(model.T), dtype=np.int64)
                rest_s = state.total_time_s() - float(state.step_times(modelled).sum())
                bound_s = bounds.dual_bound * model.time_unit_s + rest_s
    return _WindowResult(status, rel_gap, bound_s, solved, guard_fired(result))


def _chosen_window(model: _WindowModel, vid: str, g: int, evict: bool, pair: tuple[int, int],
                   incumbent_pair: tuple[int, int], values: np.ndarray, default: int
                   ) -> int:
    """The window option of gap g's move `pair` in the solution: the one the solver picked, else
    the incumbent's `default` for the incumbent's move, else the shortest (option 0)."""
    parts = model.window_vars.get((vid, g, evict), {}).get(pair)
    if not parts:
        return default if pair == incumbent_pair else 0
    return max(parts, key=lambda o: (values[parts[o]], -o))


def _shifted(windows: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Windows cut at the middles of `windows`, so a second sweep straddles the first's cuts."""
    if len(windows) < 2:
        return list(windows)
    cuts = [0] + [(c0 + c1 + 1) // 2 for c0, c1 in windows] + [windows[-1][1] + 1]
    cuts = sorted(set(cuts))
    return [(a, b - 1) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def solve_mip(problem: PlacementProblem, incumbent: Assignment, guard_s: float, seed: int,
              backend: str, workers: int, max_window_binaries: int = MAX_WINDOW_BINARIES,
              max_sweeps: int = MAX_SWEEPS, incumbent_spread_s: float | None = None,
              single_window_nodes: int = SINGLE_WINDOW_NODE_LIMIT) -> MipOutcome:
    """Improve `incumbent` (the greedy assignment) with the MIP, window by window.

    A program whose MIP has at most `max_window_binaries` binaries is one window: the MIP over
    every decision, warm-started from the incumbent. Longer programs are swept window by window
    (fix-and-optimise): the decisions that start in the window are free, all others stay at the
    incumbent, so each solve keeps or improves the whole plan. While the last sweep improved the
    plan by SWEEP_MIN_GAIN or more, another sweep runs over windows shifted by half (cut where
    the last sweep's windows had their middles), up to `max_sweeps`; it stops early once the
    windows it solved gained less than SWEEP_MIN_GAIN times their share of the binaries. With
    the time objective, another sweep also needs the last one to have improved the plan as the
    pass returns it (transfers re-spread, `respread_moves`) by SWEEP_MIN_GAIN: the MIP scores
    each transfer on its own best steps, and a gain there can vanish once they are re-spread.
    `incumbent_spread_s` is that time for the incumbent, if the caller has it.

    Every solve stops at a deterministic work limit (`_budget`), so the outcome is the same on
    any machine. `guard_s` is a wall-clock guard over all of it (model building included):
    each solve may run for what is left of it, and once it is spent the remaining windows keep
    the incumbent. A guard that fires makes the plan depend on the machine's speed and load;
    the outcome's `warnings` say so.
    """
    t_start = time.perf_counter()
    p = problem
    windows = window_bounds(p, max_window_binaries)
    assignment: Assignment = dict(incumbent)
    state = CostState(p, assignment)
    if not any(_free_tensors(p, c0, c1) for c0, c1 in windows):
        # Every tensor is pinned: tiny ones and those that never meet memory pressure go to
        # the fastest tier, optimal when that tier is at least as fast as every other.
        proven = p.dominates(p.writable[0]) and all(
            assignment[vid] == choice for vid, choice in p.pinned.items())
        return MipOutcome(assignment, "optimal" if proven else "feasible", 0.0 if proven else None,
                          state.objective_value() if proven and p.objective == "time" else None,
                          state.objective_value(), len(windows),
                          "every tensor pinned (tiny, or never under memory pressure); "
                          "nothing left to decide")
    cum = np.concatenate([[0.0], np.cumsum(_binaries_per_step(p))])
    results: list[_WindowResult] = []
    solved_any = False
    sweep = 0
    spread_s = incumbent_spread_s
    stopped = ""
    fired = 0  # solves stopped by the guard, and windows left out once it was spent
    sweep_windows = windows
    while True:
        weights = [max(float(cum[c1 + 1] - cum[c0]), 1.0) for c0, c1 in sweep_windows]
        results = []
        before = state.objective_value()
        for i, (c0, c1) in enumerate(sweep_windows):
            free = _free_tensors(p, c0, c1)
            if not free:
                results.append(_WindowResult("optimal", 0.0, None, True))
                continue
            left_s = guard_s - (time.perf_counter() - t_start)
            gained = before - state.objective_value()
            out_of_time = left_s <= 0.0 and bool(results)
            if out_of_time or (sweep > 0 and i > 0 and gained < (
                    SWEEP_MIN_GAIN * abs(before) * sum(weights[:i]) / sum(weights))):
                # the guard is spent, or this sweep no longer pays: the rest keep the incumbent
                results.append(_WindowResult("skipped", None, None, False, out_of_time))
                continue
            label = f"window {i + 1}/{len(sweep_windows)} of sweep {sweep + 1}"
            res = _solve_window(p, state, assignment, free, c0, c1, backend,
                                _budget(backend, weights[i], len(windows) == 1, left_s,
                                        single_window_nodes), seed,
                                workers, label, RELATIVE_GAP if len(windows) == 1
                                else WINDOW_RELATIVE_GAP)
            solved_any = solved_any or res.solved
            results.append(res)
        sweep += 1
        fired += sum(r.guard_fired for r in results)
        improved = state.objective_value() < before * (1 - SWEEP_MIN_GAIN)
        if len(windows) == 1 or sweep >= max_sweeps or not improved:
            break
        if guard_s - (time.perf_counter() - t_start) <= 0.0:
            fired += 1  # another sweep would have run: the guard is spent
            break
        if p.objective == "time":
            # the plan is the placement re-spread: a sweep that did not pay there ends it
            if spread_s is None:
                spread_s = _respread_time_s(p, incumbent)
            now_s = _respread_time_s(p, assignment)
            if now_s > spread_s * (1 - SWEEP_MIN_GAIN):
                stopped = (f"; stopped after sweep {sweep}: re-spread, the plan gained less than "
                           f"{100 * SWEEP_MIN_GAIN:g}% ({spread_s:.6g} -> {now_s:.6g} s)")
                break
            spread_s = now_s
        sweep_windows = _shifted(sweep_windows) if sweep % 2 else windows
    warnings = (f"place-tiers: the MIP's wall-clock guard ({guard_s:.3g} s) fired on {fired} "
                "window solve(s) or sweep(s) before their deterministic work limits, so this "
                "plan can differ on a faster or less busy machine (a longer time limit avoids "
                "it)",) if fired else ()
    if not solved_any:
        return MipOutcome(None, "greedy_fallback", None, None, None, len(windows),
                          "no solve returned a solution (" + ", ".join(
                              r.status for r in results) + ")", warnings)
    if len(windows) == 1:
        res = results[0]
        return MipOutcome(assignment, res.status, res.gap, res.bound_s,
                          state.objective_value(), 1,
                          f"one window; solver status {res.status}", warnings)
    gaps = ",".join("?" if r.gap is None else f"{100 * r.gap:.2g}%" for r in results)
    detail = (f"{len(windows)} windows, {sweep} sweep(s) of fix-and-optimise; gaps of the last "
              f"sweep's windows, each with the rest fixed: {gaps}")
    skipped = sum(r.status == "skipped" for r in results)
    if skipped:
        detail += (f" ({skipped} of them skipped: the sweep no longer paid"
                   f"{', or the guard was spent' if fired else ''})")
    detail += stopped
    return MipOutcome(assignment, "feasible", None, None, state.objective_value(), len(windows),
                      detail, warnings)


def _budget(backend: str, binaries: float, whole: bool, guard_s: float,
            single_window_nodes: int = SINGLE_WINDOW_NODE_LIMIT) -> WorkBudget:
    """A window's work limit: WINDOW_NODE_LIMIT nodes (`single_window_nodes` when the window
    is the whole program), or CP-SAT's deterministic time by the window's binaries; the guard
    is what is left of the MIP's."""
    nodes = single_window_nodes if whole else WINDOW_NODE_LIMIT
    det = max(CPSAT_DETERMINISTIC_TIME_PER_BINARY * binaries, CPSAT_MIN_DETERMINISTIC_TIME)
    return WorkBudget(None if backend == "cpsat" else nodes, det, max(guard_s, 0.05))


def _respread_time_s(problem: PlacementProblem, assignment: Assignment) -> float:
    """Predicted time of `assignment`'s plan with its transfers re-spread (what the pass
    returns)."""
    return problem.respread_parts(assignment)[2]


def _argmax(table: Mapping[int, int], values: np.ndarray) -> int:
    return max(table, key=lambda k: (values[table[k]], -k))
