"""The placement MIP of one window, built as a MathOpt model (the pass is in place_tiers.py, the
window solves and sweeps in mip.py).

The placement is decided in the segment form of placement/problem.py (runs of accesses, idle gaps
with a middle tier, eviction/prefetch windows of fixed length, read-only homes), which every
strategy shares, so that the greedy plan is a feasible point of the MIP and warm-starts it.

The MIP (OR-tools MathOpt; HiGHS by default, SCIP or CP-SAT on request). Numbers match the code.

Sets: free tensors t (not pinned, with a decision in the window); runs r and gaps g of t; tiers
K_t (the writable tiers that can hold t, plus read-only homes for inputs and constants); steps s
that the free decisions affect; kernels j (fusion groups and lone ops) that access a free tensor;
links l (tier pairs). Pinned tensors and decisions outside the window are constants.

Variables
 (V1) x[t,r,k] in {0,1}: run r of t is in tier k (a read-only k reads the home copy).
 (V2) z[t,g,k] in {0,1}: the middle tier of gap g is k.
 (V3) h[t,k] in {0,1}: t's home is read-only tier k for its whole live range.
 (V4) e[t,g,a,b] in [0,1]: move a -> b over the first steps of g (an eviction if a != b). Its
      window: the incumbent's for the incumbent's move, else the shortest that hides it; with
      MIP_WINDOW_OPTIONS, binaries e[t,g,a,b,o] choose among the window options o instead.
 (V5) f[t,g,b,c] in [0,1]: move b -> c over the last steps of g (a prefetch if b != c); windows
      likewise (f[t,g,b,c,o]).
 (V6) m[j] >= 0: time of a multi-op kernel j.
 (V7) T[s] >= 0: time of step s.
 (V8) O[k,s]: bytes resident in tier k at step s (only tiers whose capacity can bind).
 (V9) L[l,s] >= 0: busy time of link l at step s.

Constraints
 (C1) sum_k x[t,r,k] = 1 and sum_k z[t,g,k] = 1.
 (C2) x[t,r,k] <= h[t,k] and z[t,g,k] <= h[t,k] for read-only k; sum_k h[t,k] <= 1.
 (C3) moves as flows (tight LP): sum_b e[t,g,a,b] = x[t,prev(g),a], sum_a e[t,g,a,b] = z[t,g,b];
      sum_c f[t,g,b,c] = z[t,g,b], sum_b f[t,g,b,c] = x[t,next(g),c] (a = b: no move);
      with MIP_WINDOW_OPTIONS, sum_o e[t,g,a,b,o] = e[t,g,a,b] and sum_o f[t,g,b,c,o] = f[t,g,b,c].
 (C4) a gap of one or two steps between runs holds one transfer at most:
      z[t,g,k] <= x[t,prev(g),k] + x[t,next(g),k].
 (C5) occupancy: O[k,s] = O[k,s'] + bytes of the terms started - bytes of the terms ended since
      the previous row s' (terms: x over its run, z over its gap, e over its window in its source,
      f from its transfer's first step to the gap's end in its destination, minus e from the
      gap's start to its transfer's first step in its destination (the middle tier holds the
      tensor once the eviction starts), h over the live range); O[k,s] <= capacity_k -
      constants[s]; rows only where a term starts or the constants grow, and only where the
      tier could overflow. These are `PlacementProblem.layout`'s residency pieces exactly.
 (C6) kernel time: a lone op's T[s] >= compute_j + overhead and
      T[s] >= overhead + sum_access bytes / bandwidth_k * x; for a multi-op kernel the same bounds
      on m[j], and T[s] >= w_s * m[j] for each of its steps (w_s: its flop share).
 (C7) links: L[l,s] = L[l,s-1] + shares of the transfers starting at s - shares of those that
      ended at s-1 (share = bytes / link bandwidth / window steps); T[s] >= constant load + L[l,s];
      T[s] >= the constant load of every other link.
 (C8) ties: an alias op's operand run and result run (`Tie`: the same buffer under another
      shape) share their tier, x[t,r,k] = x[t',r',k] for every k (a read-only k is then out for
      both, since the result may not use it).

Objective
 (O1) time: minimise sum_s T[s] (plus the constant time of the other steps, this is the cost
      model's predicted time of the plan: the model is exact for segment-form plans).
 (O2) energy: minimise sum bytes * energy_pj_per_byte over accesses and transfers (on both tiers)
      + 1e-6 * sum_s T[s], subject to sum_s T[s] <= the incumbent's time at those steps.

Every solve has a deterministic work limit (WINDOW_NODE_LIMIT branch-and-bound nodes, or CP-SAT's
deterministic time), a wall-clock guard behind it (the time left of the MIP's limit), a seed and a
worker count, and the incumbent (the greedy plan) as its solution hint. The work limits decide the
plan, so the same input gives the same plan on any machine; a guard that fires is a warning in the
plan (`Plan.warnings`). A program whose MIP has more than MAX_WINDOW_BINARIES binaries is
decomposed into windows of steps solved in turn (fix-and-optimise): a window frees the decisions
that start in it and keeps all others at the incumbent, so each solve keeps or improves the whole
plan. A window's bound holds only with the rest fixed, so a decomposed solve is reported as
"feasible", its gap measured against the program's lower bound (tiermap/bounds/knapsack.py).

A move's window (V4/V5) is how long the tensor is held for it; its link time is spread over
the run of steps inside the window that hides it best under the estimated op times
(`PlacementProblem.move_span`), the same run in this model, in greedy and in the plan, so the
model stays exact. After the solve, `respread_moves` moves each transfer anywhere in its gap to
where it costs least given all the others (a copy that rides on a long kernel another copy
already fills goes to the next one; an eviction may run past its window onto a later kernel),
where the tiers have the room for the longer hold, then makes a move in one-step chunks on the
kernels with free link time where no single run hides it as well (tiermap/ir/plan.py: a move may
be made in chunks), and keeps the result only if it is faster and fits.

The plan the MIP finds is re-evaluated by the cost model; if it is worse than greedy (it should
not be: the model is exact for segment-form plans) the greedy plan is returned and the notes
say so. If no solve returns a solution, the greedy plan is returned with solver status
"greedy_fallback".
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np

from tiermap.errors import PassError
from tiermap.mathopt import WorkBudget, load_mathopt, quiet_stdout, solve_parameters
from tiermap.placement.cost_state import CostState
from tiermap.placement.problem import PlacementProblem
from tiermap.placement.segments import Choice, Segments

# A window holds about this many binary variables; longer programs are decomposed. 750 since
# 2026-12-07 (was 1500): with more fused kernels each window's root solve got about 4x harder,
# and the 12-layer training step's 1500-binary windows took 22 s of its 23 s guard at the
# default 30 s limit on this 2-core VM; 750-binary windows take a third of that for a plan
# 1.9% slower (450.7 against 442.5 us on sn40l).
MAX_WINDOW_BINARIES = 750
# Whether the MIP chooses among the window-length options of every move (more binaries, slower
# solves); otherwise a move keeps the incumbent's window, and a new move takes the shortest.
MIP_WINDOW_OPTIONS = False
# At most this many fix-and-optimise sweeps over a decomposed program by default
# (`PlaceTiersPass.max_sweeps`); another sweep runs only if the last one improved the plan by at
# least SWEEP_MIN_GAIN, and a later sweep stops once the windows it has solved gained less than
# that fraction times their share of the binaries. Measured on the 12-layer training step on the
# starved a100-256m (plan after re-spreading, MIP seconds): 1 sweep 49.3 ms in 3.5 s, 2 sweeps
# 44.9 ms in 6.0 s, 3 sweeps 44.1 ms in 9.8 s, 4 sweeps 42.0 ms in 13.1 s; two keep planning
# within twice XLA's compile time (benchmarks/placement.py), sn40l stops after two by itself.
MAX_SWEEPS = 2
SWEEP_MIN_GAIN = 1e-3
# Where a window's solve stops (deterministic work, see tiermap/mathopt.py `WorkBudget`): HiGHS
# and SCIP at this many branch-and-bound nodes, i.e. the root node with its presolve, cuts and
# heuristics. Measured on the 12-layer training step, starved a100-256m (docs/benchmarks.md,
# "Determinism"): 1 node and 20 nodes give the same plan (40.32 ms), 20 take 1.16x as long; the
# wall-clock windows this replaces stopped at node 0 on a busy machine.
WINDOW_NODE_LIMIT = 1
# A program that is one window (a small one) may branch further, to prove its plan optimal.
SINGLE_WINDOW_NODE_LIMIT = 1000
# CP-SAT's deterministic time (its own work units, about seconds on one fast core) per binary
# variable that starts in the window, and at least CPSAT_MIN_DETERMINISTIC_TIME.
CPSAT_DETERMINISTIC_TIME_PER_BINARY = 4e-4
CPSAT_MIN_DETERMINISTIC_TIME = 0.5
# Relative gap at which a solve stops: the whole program in one window, or one of several
# windows (looser, so that time is left for another sweep).
RELATIVE_GAP = 1e-4
WINDOW_RELATIVE_GAP = 2e-3
# Under a planning deadline, the MIP leaves this reserve for the work after it: this many times
# the measured time of building the greedy plan (the MIP's plan is built the same way, its
# transfers re-spread with two more evaluations, and the independent verification takes about 7
# such times, up to 13 measured on a 19k-op program), plus a constant; below MIN_MIP_TIME_S
# left, the MIP is skipped.
RESERVE_PER_PLAN_BUILD = 25.0
RESERVE_S = 0.05
# ... and this fraction of the time limit, for the noise in those times on a loaded machine (the
# 64-layer program overran its 40 s by 0.5 s without it).
RESERVE_FRACTION = 0.05
MIN_MIP_TIME_S = 0.1
# The capacity LP's time limit (less when the planning deadline is near: a third of what is left).
CAPACITY_LP_TIME_LIMIT_S = 60.0
# Weight of time in the energy objective (O2), per time unit.
ENERGY_TIME_WEIGHT = 1e-6
# CP-SAT works on integers: time and bytes are scaled to this many units per reference amount.
CPSAT_RESOLUTION = 1000.0
_NO_HOME = -2
_UNDECIDED = -1


class _WindowModel:
    """The MIP over the decisions that start in steps [c0, c1]; all others fixed at the incumbent.

    `base` is the incumbent's CostState with the free tensors (those with a decision in the
    window) taken out: its occupancy, link loads and kernel times are the constants.
    """

    def __init__(self, problem: PlacementProblem, base: CostState, incumbent: Mapping[str, Choice],
                 free: Sequence[str], c0: int, c1: int, backend: str,
                 incumbent_step_s: np.ndarray | None) -> None:
        self.p = p = problem
        self.base = base
        self.incumbent = incumbent
        self.c0, self.c1 = c0, c1
        self.integer = backend == "cpsat"
        # The model is collected as arrays (variables are their integer ids; constants are
        # Python floats) and handed to MathOpt as one ModelProto: one call, not one per
        # coefficient.
        self.var_lb: list[float] = []
        self.var_ub: list[float] = []
        self.var_int: list[bool] = []
        self.row_lb: list[float] = []
        self.row_ub: list[float] = []
        self.mat_row: list[int] = []
        self.mat_col: list[int] = []
        self.mat_coef: list[float] = []
        n = p.num_steps
        ref_s = float(np.mean(p.est_op_s[c0:c1 + 1])) if c1 >= c0 else 1.0
        self.time_unit_s = (ref_s if ref_s > 0 else 1e-9) / (
            CPSAT_RESOLUTION if self.integer else 1.0)
        num_tiers = len(p.tier_names)
        self.x: dict[tuple[str, int], dict[int, int]] = {}
        self.z: dict[tuple[str, int], dict[int, int]] = {}
        self.h: dict[str, dict[int, int]] = {}
        self.hint_values: dict[int, float] = {}
        self.const_occ = np.zeros((num_tiers, n + 1))
        self.occ_terms: list[list[tuple[Any, float, int, int]]] = [[] for _ in range(num_tiers)]
        self.const_link: dict[tuple[int, int], np.ndarray] = {}
        self.link_terms: dict[tuple[int, int], list[tuple[Any, float, int, int]]] = {}
        self.energy_terms: list[tuple[Any, float]] = []
        self.T: dict[int, int] = {}
        self.window_vars: dict[tuple[str, int, bool], dict[tuple[int, int], dict[int, int]]] = (
            defaultdict(dict))
        self.free = set(free)
        # (V1)-(V5), (C1)-(C4): decisions, moves, occupancy and link terms of the free tensors.
        for vid in free:
            self._tensor(vid, p.segments[vid])
        self._ties()  # (C8)
        self._kernels()  # (V6), (C6)
        for k in range(num_tiers):  # (V8), (C5)
            self._occupancy_chain(k)
        for key in sorted(set(self.link_terms)):  # (V9), (C7)
            self._link_chain(key)
        self._other_links()
        # (O1) / (O2)
        time_sum = [(v, 1.0) for v in self.T.values()]
        self.energy_unit_pj = 1.0
        if p.objective == "energy":
            scale = sum(abs(c) for _v, c in self.energy_terms) or 1.0
            self.energy_unit_pj = scale / 1e6
            if incumbent_step_s is not None and self.T:
                budget_s = float(incumbent_step_s[np.array(sorted(self.T))].sum())
                self._row(time_sum, -math.inf, budget_s / self.time_unit_s * (1 + 1e-9))
            objective = [(v, c / self.energy_unit_pj) for v, c in self.energy_terms
                         if not isinstance(v, float)]
            objective += [(v, ENERGY_TIME_WEIGHT) for v, _c in time_sum]
        else:
            objective = time_sum
        self.model = self._export(f"place-tiers[{c0}..{c1}]", objective)

    # --- decisions as variables or constants ------------------------------------------------

    def in_window(self, step: int) -> bool:
        return self.c0 <= step <= self.c1

    def val(self, vid: str, kind: str, i: int, k: int) -> Any:
        """Run (kind "x") or gap ("z") i of `vid` in tier k: a variable or a 0/1 constant."""
        table = (self.x if kind == "x" else self.z).get((vid, i))
        if table is not None:
            return table.get(k, 0.0)
        fixed = self.incumbent[vid]
        return 1.0 if (fixed.runs if kind == "x" else fixed.gaps)[i] == k else 0.0

    def home_val(self, vid: str, k: int) -> Any:
        table = self.h.get(vid)
        if table is not None:
            return table.get(k, 0.0)
        return 1.0 if self.incumbent[vid].home == k else 0.0

    def step_var(self, s: int) -> Any:
        """(V7) T[s], created on first use."""
        var = self.T.get(s)
        if var is None:
            var = self.T[s] = self._cont()
        return var

    def _one_hot(self, tiers: Sequence[int], hinted: int) -> dict[int, int]:
        """(V1)/(V2) with (C1): one binary per tier, exactly one set."""
        table = {k: self._binary() for k in tiers}
        self._row([(v, 1.0) for v in table.values()], 1.0, 1.0)
        for k, v in table.items():
            self.hint_values[v] = 1.0 if hinted == k else 0.0
        return table

    def _tensor(self, vid: str, seg: Segments) -> None:
        p = self.p
        ro = p.read_only
        tiers = list(seg.tiers) + list(seg.homes)
        hint = self.incumbent[vid]
        if seg.homes and self.in_window(seg.first):  # (V3), (C2)
            hv = {k: self._binary() for k in seg.homes}
            self.h[vid] = hv
            self._row([(v, 1.0) for v in hv.values()], -math.inf, 1.0)
            for k, v in hv.items():
                self.hint_values[v] = 1.0 if hint.home == k else 0.0
        for r, run in enumerate(seg.runs):
            if self.in_window(run.lo):
                self.x[(vid, r)] = self._one_hot(tiers, hint.runs[r])
        for g, gap in enumerate(seg.gaps):
            if self.in_window(gap.lo):
                self.z[(vid, g)] = self._one_hot(tiers, hint.gaps[g])
        for k in seg.homes:  # (C2) a read-only tier only as the home
            hk = self.home_val(vid, k)
            for table in [self.x.get((vid, r)) for r in range(len(seg.runs))] + [
                    self.z.get((vid, g)) for g in range(len(seg.gaps))]:
                if table is not None and k in table:
                    self._le(table[k], hk)
        nbytes = seg.nbytes
        for k in seg.homes:
            self._occ(k, seg.first, seg.last, self.home_val(vid, k), nbytes)
        for r, run in enumerate(seg.runs):
            for k in seg.tiers:
                self._occ(k, run.lo, run.hi, self.val(vid, "x", r, k), nbytes)
        for g, gap in enumerate(seg.gaps):
            for k in seg.tiers:
                self._occ(k, gap.lo, gap.hi, self.val(vid, "z", g, k), nbytes)
            if gap.prev_run is not None:  # (V4), (C3): evictions at the gap's start
                src = {a: self.val(vid, "x", gap.prev_run, a) for a in tiers}
                dst = {b: self.val(vid, "z", g, b) for b in tiers}
                pair = (hint.runs[gap.prev_run], hint.gaps[g])
                for (a, b), coef in self._flow(src, dst, set(), pair).items():
                    if a == b or ro[b] or (isinstance(coef, float) and not coef):
                        continue
                    for w, part in self._window_split(vid, seg, g, a, b, True, coef, pair):
                        if not ro[a]:
                            self._occ(a, gap.lo, gap.lo + w - 1, part, nbytes)
                        m_lo, m_hi = p.move_span(seg, g, a, b, True, w)
                        if m_lo > gap.lo:  # b holds it from the transfer's first step
                            self._occ(b, gap.lo, m_lo - 1, part, -nbytes)
                        self._move(a, b, m_lo, m_hi, part, nbytes)
            if gap.next_run is None:
                continue
            nxt = gap.next_run
            if gap.single_move and gap.prev_run is not None:  # (C4)
                for k in tiers:
                    zk = self.val(vid, "z", g, k)
                    if not isinstance(zk, float):
                        self._le_sum([(zk, 1.0), (self.val(vid, "x", gap.prev_run, k), -1.0),
                                      (self.val(vid, "x", nxt, k), -1.0)], 0.0)
            src = {b: self.val(vid, "z", g, b) for b in tiers}
            dst = {c: self.val(vid, "x", nxt, c) for c in tiers}
            pair = (hint.gaps[g], hint.runs[nxt])
            for (b, c), coef in self._flow(src, dst, set(), pair).items():  # (V5)
                if b == c or ro[c] or (isinstance(coef, float) and not coef):
                    continue
                for w, part in self._window_split(vid, seg, g, b, c, False, coef, pair):
                    m_lo, m_hi = p.move_span(seg, g, b, c, False, w)
                    self._occ(c, m_lo, gap.hi, part, nbytes)  # from the transfer's first step
                    self._move(b, c, m_lo, m_hi, part, nbytes)

    def _ties(self) -> None:
        """(C8) runs tied by an alias op share their tier: x[t,r,k] = x[t',r',k]."""
        for tie in self.p.ties:
            if tie.src not in self.free and tie.dst not in self.free:
                continue
            tiers = set(self.p.segments[tie.src].tiers) | set(self.p.segments[tie.src].homes)
            tiers |= set(self.p.segments[tie.dst].tiers)
            for k in sorted(tiers):
                a = self.val(tie.src, "x", tie.src_run, k)
                b = self.val(tie.dst, "x", tie.dst_run, k)
                if isinstance(a, float) and isinstance(b, float):
                    if a != b:
                        raise PassError("place-tiers", f"fixed decisions break the tie of "
                                        f"{tie.src} and {tie.dst} at step {tie.step}")
                    continue
                self._row([(a, 1.0), (b, -1.0)], 0.0, 0.0)

    def _window_split(self, vid: str, seg: Segments, g: int, src: int, dst: int, evict: bool,
                      coef: Any, hint_pair: tuple[int, int]) -> list[tuple[int, Any]]:
        """(V4)/(V5) window lengths: a move that is a variable splits into one variable per
        window option (summing to it); a fixed move keeps the incumbent's window."""
        options = self.p.window_options(seg, g, src, dst, evict)
        fixed = self.incumbent[vid]
        chosen = (fixed.evict_opt if evict else fixed.prefetch_opt)[g]
        if hint_pair != (src, dst):
            chosen = 0  # a move the incumbent does not make starts with the shortest window
        if isinstance(coef, float) or len(options) == 1 or not MIP_WINDOW_OPTIONS:
            return [(options[min(chosen, len(options) - 1)], coef)]
        # binary: a fractional mix of windows would model a capacity the plan does not have
        parts = {o: self._binary() for o in range(len(options))}
        self._row([(coef, -1.0)] + [(var, 1.0) for var in parts.values()], 0.0, 0.0)
        self.window_vars[(vid, g, evict)][(src, dst)] = parts
        on = hint_pair == (src, dst)
        for o, var in parts.items():
            self.hint_values[var] = 1.0 if on and o == min(chosen, len(options) - 1) else 0.0
        return [(options[o], var) for o, var in parts.items()]

    def _occ(self, k: int, lo: int, hi: int, coef: Any, nbytes: int) -> None:
        """Tier k holds `nbytes` over [lo, hi] when `coef` (a variable or a 0/1 constant) is 1
        (negative `nbytes` takes back what another term counted)."""
        if isinstance(coef, float):
            if coef:
                self.const_occ[k, lo] += coef * nbytes
                self.const_occ[k, hi + 1] -= coef * nbytes
        else:
            self.occ_terms[k].append((coef, float(nbytes), lo, hi))

    def _move(self, a: int, b: int, lo: int, hi: int, coef: Any, nbytes: int) -> None:
        """A transfer a -> b over [lo, hi] when `coef` is 1: link time and energy."""
        p = self.p
        self.energy_terms.append((coef, nbytes * (p.energy_pj[a] + p.energy_pj[b])))
        key = (a, b) if a < b else (b, a)
        share_s = nbytes / p.link_bw(a, b) / (hi - lo + 1)
        if isinstance(coef, float):
            if coef:
                arr = self.const_link.setdefault(key, np.zeros(self.p.num_steps + 1))
                arr[lo] += share_s * coef
                arr[hi + 1] -= share_s * coef
        else:
            self.link_terms.setdefault(key, []).append((coef, share_s, lo, hi))

    def _kernels(self) -> None:
        """(V6), (C6): times of the kernels that access a free tensor."""
        p, base = self.p, self.base
        tu = self.time_unit_s
        overhead = p.target.op_overhead_s
        touched = sorted({j for vid in self.free for j, _s, _b, _r in p.touches.get(vid, ())})
        for j in touched:
            kernel = p.kernels[j]
            const_s = float(base.kernel_mem_s[j])
            terms: list[tuple[Any, float]] = []
            for vid, step, nbytes, is_read in kernel.accesses:
                if vid not in self.free:
                    continue  # counted in base.kernel_mem_s
                seg = p.segments[vid]
                r = seg.run_of_step[step]
                bw = p.read_bw if is_read else p.write_bw
                for k in list(seg.tiers) + list(seg.homes):
                    xv = self.val(vid, "x", r, k)
                    if isinstance(xv, float):
                        if xv:
                            const_s += nbytes / bw[k]
                            self.energy_terms.append((1.0, nbytes * p.energy_pj[k]))
                    else:
                        terms.append((xv, nbytes / bw[k] / tu))
                        self.energy_terms.append((xv, nbytes * p.energy_pj[k]))
            lone = len(kernel.steps) == 1
            var = self.step_var(kernel.steps[0]) if lone else self._cont()
            self._ge_const(var, (max(float(p.kernel_compute_s[j]), const_s) + overhead) / tu)
            if terms:
                self._ge_terms(var, terms, (const_s + overhead) / tu)
            if not lone:
                for s in kernel.steps:
                    self._ge_terms(self.step_var(s), [(var, float(p.step_weight[s]))], 0.0)

    def _link_load_s(self, key: tuple[int, int]) -> np.ndarray:
        """Constant load of a link per step: the base plus the fixed moves of free tensors."""
        n = self.p.num_steps
        load = self.base.links.get(key)
        out = np.zeros(n) if load is None else load.copy()
        extra = self.const_link.get(key)
        if extra is not None:
            out += np.cumsum(extra[:n])
        return out

    def _link_chain(self, key: tuple[int, int]) -> None:
        """(V9), (C7): L[l,s] = L[l,s'] + shares started - shares ended since the last row s';
        T[s] >= constant load + L[l,s] at every step where a variable share is active."""
        tu = self.time_unit_s
        const = self._link_load_s(key)
        starts: dict[int, list[tuple[Any, float]]] = {}
        ends: dict[int, list[tuple[Any, float]]] = {}
        for var, share_s, lo, hi in self.link_terms[key]:
            starts.setdefault(lo, []).append((var, share_s / tu))
            ends.setdefault(hi + 1, []).append((var, share_s / tu))
        prev = None
        pending: list[tuple[Any, float]] = []
        active = 0
        for s in range(min(starts), max(ends)):
            st, en = starts.get(s, []), ends.get(s, [])
            active += len(st) - len(en)
            pending.extend(st)
            pending.extend((v, -c) for v, c in en)
            if active <= 0:
                prev, pending = None, []
                continue
            if pending or prev is None:
                cur = self._cont()
                self._eq(cur, pending + ([(prev, 1.0)] if prev is not None else []))
            else:
                cur = prev  # nothing started or ended: the same load as the last row
            self._ge_terms(self.step_var(s), [(cur, 1.0)], const[s] / tu)
            prev, pending = cur, []

    def _other_links(self) -> None:
        """T[s] >= every link's constant load at the steps this model times, and the op time
        of the steps no free tensor's kernel touches (a link chain created their T[s])."""
        if not self.T:
            return
        tu = self.time_unit_s
        keys = set(self.base.links) | set(self.const_link)
        if keys:
            steps = np.array(sorted(self.T), dtype=np.int64)
            most = np.zeros(len(steps))
            for key in keys:
                most = np.maximum(most, self._link_load_s(key)[steps])
            for s, load_s in zip(steps.tolist(), most.tolist(), strict=True):
                self._ge_const(self.T[s], load_s / tu)
        # untouched steps that only a link chain created: their op time is a constant
        p, base = self.p, self.base
        touched = {s for vid in self.free for j, _s, _b, _r in p.touches.get(vid, ())
                   for s in p.kernels[j].steps}
        rest = [s for s in self.T if s not in touched]
        if rest:
            op_s = base.op_times(np.array(rest, dtype=np.int64))
            for s, t_s in zip(rest, op_s.tolist(), strict=True):
                self._ge_const(self.T[s], t_s / tu)

    def _occupancy_chain(self, k: int) -> None:
        """(V8), (C5): O[k,s] = O[k,s-1] + starting terms - ended terms <= cap - constants[s],
        for a tier whose capacity the terms could exceed."""
        terms = self.occ_terms[k]
        if not terms:
            return
        n = self.p.num_steps
        const = self.base.occ[k].astype(float) + np.cumsum(self.const_occ[k, :n])
        cap = float(self.p.capacity[k])
        diff = np.zeros(n + 1)
        starts: dict[int, list[tuple[Any, float]]] = {}
        ends: dict[int, list[tuple[Any, float]]] = {}
        for var, nbytes, lo, hi in terms:
            if nbytes > 0:  # the most the terms can hold: negative ones (an eviction's
                diff[lo] += nbytes  # destination before its transfer starts) only lower it
                diff[hi + 1] -= nbytes
            starts.setdefault(lo, []).append((var, nbytes))
            ends.setdefault(hi + 1, []).append((var, nbytes))
        active = np.cumsum(diff[:n])
        if (const + active).max(initial=0.0) <= cap:
            return
        # bytes in units of cap / 1e6 for the LP solvers; exact bytes for CP-SAT (integers)
        scale = 1.0 if self.integer else max(cap / 1e6, 1.0)
        prev = None
        pending: list[tuple[Any, float]] = []
        count = 0
        grows = np.flatnonzero(np.diff(const, prepend=const[0]) > 0).tolist()
        for s in sorted((set(starts) | set(ends) | set(grows)) - {n}):
            st, en = starts.get(s, []), ends.get(s, [])
            count += len(st) - len(en)
            pending.extend((v, b / scale) for v, b in st)
            pending.extend((v, -b / scale) for v, b in en)
            if count <= 0:
                prev, pending = None, []  # every variable term has ended
                continue
            if const[s] + active[s] <= cap:
                continue  # cannot bind here; the changes carry over to the next row
            room = (cap - const[s]) / scale
            if self.integer:
                cur = self._var(-(2.0**62), float(math.floor(room + 1e-9)), True)
            else:
                # exact: a plan that fills the tier to the byte is feasible (greedy's often
                # is). A solution that uses the solver's tolerances to overfill it is caught
                # when `_solve_window` re-checks capacity on the rounded choice, and dropped.
                cur = self._var(-math.inf, room)
            self._eq(cur, pending + ([(prev, 1.0)] if prev is not None else []))
            prev, pending = cur, []

    # --- small helpers ----------------------------------------------------------------------

    def _var(self, lb: float, ub: float, integer: bool = False) -> int:
        """A new variable (its id)."""
        self.var_lb.append(lb)
        self.var_ub.append(ub)
        self.var_int.append(integer)
        return len(self.var_lb) - 1

    def _binary(self) -> int:
        return self._var(0.0, 1.0, True)

    def _cont(self) -> int:
        """A non-negative quantity: continuous, or integer for CP-SAT."""
        return self._var(0.0, math.inf, self.integer)

    def _row(self, terms: Sequence[tuple[Any, float]], lb: float, ub: float) -> None:
        """lb <= sum c * v <= ub over variables v (ids); constant terms (floats) move into
        the bounds. Repeated variables are summed when the model is exported."""
        const = 0.0
        r = len(self.row_lb)
        for v, c in terms:
            if isinstance(v, float):
                const += v * c
            else:
                self.mat_row.append(r)
                self.mat_col.append(v)
                self.mat_coef.append(c)
        self.row_lb.append(lb - const)
        self.row_ub.append(ub - const)

    def _le_sum(self, terms: Sequence[tuple[Any, float]], ub: float) -> None:
        """sum c * v <= ub, each v a variable or a float constant."""
        if all(isinstance(v, float) for v, _c in terms):
            total = sum(v * c for v, c in terms)
            if total > ub:
                raise PassError("place-tiers", f"fixed decisions contradict: {total} > {ub}")
            return
        self._row(terms, -math.inf, ub)

    def _le(self, a: Any, b: Any) -> None:
        """a <= b, each a variable or a float constant."""
        self._le_sum([(a, 1.0), (b, -1.0)], 0.0)

    def _ge_const(self, var: int, value: float) -> None:
        """var >= value (skipped when value <= 0)."""
        if value > 0:
            self._row([(var, 1.0)], value, math.inf)

    def _ge_terms(self, var: int, terms: Sequence[tuple[Any, float]], const: float) -> None:
        """var >= const + sum c * v."""
        self._row([(var, 1.0)] + [(v, -c) for v, c in terms], const, math.inf)

    def _eq(self, var: int, terms: Sequence[tuple[Any, float]]) -> None:
        """var == sum c * v; CP-SAT (integer variables) gets coefficients rounded away from 0,
        the same way where a term starts and where it ends, so the chain stays exact."""
        if self.integer:
            terms = [(v, math.copysign(math.ceil(abs(c) - 1e-9), c)) for v, c in terms]
        self._row([(var, 1.0)] + [(v, -c) for v, c in terms], 0.0, 0.0)

    def _export(self, name: str, objective: Sequence[tuple[int, float]]) -> Any:
        """The collected variables, rows and objective (minimised) as a MathOpt model."""
        mathopt = load_mathopt()  # first: binds OR-tools' native code to its own protobuf
        from ortools.math_opt import model_pb2

        proto = model_pb2.ModelProto(name=name)
        num_vars = len(self.var_lb)
        proto.variables.ids.extend(range(num_vars))
        proto.variables.lower_bounds.extend(self.var_lb)
        proto.variables.upper_bounds.extend(self.var_ub)
        proto.variables.integers.extend(self.var_int)
        obj_ids, obj_coefs = _summed(np.zeros(len(objective), dtype=np.int64),
                                     [v for v, _c in objective], [c for _v, c in objective],
                                     num_vars)[1:]
        proto.objective.maximize = False
        proto.objective.linear_coefficients.ids.extend(obj_ids.tolist())
        proto.objective.linear_coefficients.values.extend(obj_coefs.tolist())
        num_rows = len(self.row_lb)
        proto.linear_constraints.ids.extend(range(num_rows))
        proto.linear_constraints.lower_bounds.extend(self.row_lb)
        proto.linear_constraints.upper_bounds.extend(self.row_ub)
        rows, cols, coefs = _summed(np.array(self.mat_row, dtype=np.int64), self.mat_col,
                                    self.mat_coef, num_vars)
        matrix = proto.linear_constraint_matrix
        matrix.row_ids.extend(rows.tolist())
        matrix.column_ids.extend(cols.tolist())
        matrix.coefficients.extend(coefs.tolist())
        return mathopt.Model.from_model_proto(proto)

    def _flow(self, src: Mapping[int, Any], dst: Mapping[int, Any],
              forbidden: set[tuple[int, int]], hint_pair: tuple[int, int] | None
              ) -> dict[tuple[int, int], Any]:
        """(V4)/(V5) with (C3): tier-to-tier moves between two one-hot choices, as a flow.

        Returns (from, to) -> a variable in [0, 1] or a 0/1 constant, with
        sum_to move[a, .] = src[a] and sum_from move[., b] = dst[b] (the transportation polytope,
        whose LP relaxation is far tighter than move >= src + dst - 1). Pairs in `forbidden` are 0.
        """
        out: dict[tuple[int, int], Any] = {}
        if all(isinstance(v, float) for v in src.values()):
            for a, va in src.items():
                if va > 0.5:
                    for b, vb in dst.items():
                        if (a, b) not in forbidden:
                            out[(a, b)] = vb
                        elif not (isinstance(vb, float) and not vb):
                            self._le(vb, 0.0)
            return out
        if all(isinstance(v, float) for v in dst.values()):
            for b, vb in dst.items():
                if vb > 0.5:
                    for a, va in src.items():
                        if (a, b) not in forbidden:
                            out[(a, b)] = va
                        else:
                            self._le(va, 0.0)
            return out
        rows_src: dict[int, list[tuple[Any, float]]] = {a: [(v, -1.0)] for a, v in src.items()}
        rows_dst: dict[int, list[tuple[Any, float]]] = {b: [(v, -1.0)] for b, v in dst.items()}
        for a in src:
            for b in dst:
                if (a, b) in forbidden:
                    continue
                var = self._var(0.0, 1.0, self.integer)
                rows_src[a].append((var, 1.0))
                rows_dst[b].append((var, 1.0))
                out[(a, b)] = var
                if hint_pair is not None and self.integer:
                    self.hint_values[var] = 1.0 if hint_pair == (a, b) else 0.0
        for terms in list(rows_src.values()) + list(rows_dst.values()):
            self._row(terms, 0.0, 0.0)
        return out

    # --- solve ----------------------------------------------------------------------------

    def solve(self, backend: str, budget: WorkBudget, seed: int, workers: int,
              relative_gap: float = RELATIVE_GAP) -> Any:
        mo = load_mathopt()

        params = solve_parameters(backend, seed, solver_workers(backend, workers), budget,
                                  relative_gap)
        solver = {"highs": mo.SolverType.HIGHS, "scip": mo.SolverType.GSCIP}.get(
            backend, mo.SolverType.CP_SAT)
        model_params = None
        if self.hint_values:
            hint = {self.model.get_variable(v, validate=False): value
                    for v, value in self.hint_values.items()}
            model_params = mo.ModelSolveParameters(
                solution_hints=[mo.SolutionHint(variable_values=hint)])
        return solve_with_hint_fallback(self.model, solver, params, model_params, budget.guard_s)


def solve_with_hint_fallback(model: Any, solver: Any, params: Any, model_params: Any,
                             guard_s: float) -> Any:
    """`mathopt.solve` with the hint in `model_params`; if the solver fails on it, again without it
    (the same work limit, the guard's time that is left). HiGHS rejects some partial MIP starts
    with an internal error on models it solves without them; the caller keeps its incumbent
    unless the new solution is better, so dropping the hint loses nothing but speed."""
    mo = load_mathopt()

    t0 = time.perf_counter()
    try:
        with quiet_stdout():
            return mo.solve(model, solver, params=params, model_params=model_params)
    except Exception:
        if model_params is None:
            raise
        params.time_limit = timedelta(seconds=max(guard_s - (time.perf_counter() - t0),
                                                  0.05))
        with quiet_stdout():
            return mo.solve(model, solver, params=params)


def _summed(rows: np.ndarray, cols: Sequence[int], coefs: Sequence[float], num_cols: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries (row, col, coef) in row-major order, repeated (row, col) summed, zeros dropped
    (the sparse form a ModelProto takes)."""
    width = max(num_cols, 1)
    keys = rows * width + np.asarray(cols, dtype=np.int64)
    unique, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(coefs, dtype=float), minlength=len(unique))
    keep = sums != 0.0
    unique, sums = unique[keep], sums[keep]
    return unique // width, unique % width, sums


def solver_workers(backend: str, workers: int) -> int:
    """Threads a backend is given: HiGHS always one (see `_ChunkModel.solve`), else `workers`."""
    return 1 if backend == "highs" else workers


def default_workers() -> int:
    """Solver threads: the machine's cores, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))
