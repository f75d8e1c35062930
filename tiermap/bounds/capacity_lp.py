"""A lower bound on a program's predicted time that respects tier capacities over time (an LP).

`bounds.knapsack.program_lower_bound_s` charges each kernel as if its tensors could sit in the
fastest tier that holds them one step at a time (a per-step knapsack). When a fast tier binds over
many steps (sn40l's 520 MiB SRAM during a training step, a GPU with little HBM) that bound is far
below every plan: a tensor kept in SRAM between its uses occupies it all along, and one that leaves
must be moved back. This LP charges both. It is a relaxation of every plan the verifier accepts
(tiermap/ir/plan.py's semantics), not of the placement MIP's segment form, so it bounds every
strategy; OR-tools lives in passes/, hence this module is here and not in costmodel/.

Tiers. Writable residency tiers whose capacity the live tensors exceed at some step are binding (B).
The other writable tiers merge into one free tier F with their best bandwidths and no capacity, and
read-only tiers into one home tier R (program inputs and constants only, always holding them).
Merging can only lower the optimum: every plan maps onto the merged tiers at no greater cost.

Per tensor t with accesses (reads or the producer's write, one per step) at steps a_1 < ... < a_m
(for a program input first read after its live range starts, a virtual access a_0 at the start),
and first[t], the earliest step a move of t may start: its live range's start, a step later for a
produced tensor, whose copies start after its write (tiermap/ir/plan.py):

 (A) alias buffers: an alias op's result is written where its operand resides (tiermap/ir/plan.py);
     when the operand dies at that op the two are one buffer, one tensor t here, with the
     operand's accesses then the result's over the union of their live ranges (chains fold into
     their first buffer). Left apart, the result's first access would be a free start in F.

Variables (all in [0, 1] unless said)
 (V1) y[t,i,k]: the fraction of access i served from tier k in B ∪ {F} ∪ {R}.
 (V2) v[t,i,k]: t is usable in k at a_i (resident, not mid-transfer into k); k in B ∪ {F}.
 (V3) s[t,i,k]: t is usable in k at a_i and stays there through a_{i+1}; k in B.
 (V4) p[t,i,k,l]: t becomes usable in k at a_{i+1} by a move that starts L steps before a_{i+1},
      l <= L < u (lead classes l = 1, 2, 4, ...; the last reaches back to first[t]);
      n[t,i,F]: a move into F ends between a_i and a_{i+1} (o[t]: after the last access).
 (V5) T[s] >= 0: the time of step s; P[s] = T[0] + ... + T[s].
 (V6) e[t,i,l]: with one binding tier k and no home, t leaves k in the gap after a_i and its
      copy in F is made by a move that ends L steps after a_i, l <= L < u (classes [0, 1), then
      lengths growing EVICT_CLASS_RATIO-fold, the last reaching a_{i+1} - 1).

Constraints
 (C1) sum_k y[t,i,k] = 1; y[t,i,k] <= v[t,i,k]; R only for inputs and constants.
 (C2) a produced tensor is written into one writable tier at its producer step (plan.py):
      v[t,1,k] <= y[t,1,k].
 (C3) usable in k at a_{i+1}: held since a_i, or moved in: v[t,i+1,k] <= s[t,i,k] + sum_l p;
      for F, v[t,i+1,F] <= v[t,i,F] + n[t,i,F].
 (C4) s[t,i,k] <= v[t,i,k].
 (C5) one binding tier, no home: a move into it needs a copy in F, which was written there, is
      an input's, or was moved there: sum_l p[t,i,k,l] <= v[t,first,F] + sum_i n[t,i,F] + o[t].
      The virtual access a_0 is somewhere: sum_k v[t,0,k] >= 1.
 (C6) capacity: at every step where tier k in B can overflow, sum_t bytes_t * (v at its access
      steps + s inside its gaps + p[.,l] over the l steps before the access) <= capacity_k.
 (C7) kernel time: T[s] >= w_s * (compute_j + overhead) and
      T[s] >= w_s * (overhead + sum_access bytes / bandwidth_k * y) for kernel j at step s (w_s: the
      step's flop share of the kernel; a multi-step kernel's time is one variable m[j]).
 (C8) link rate: over any range of steps D, the moves whose steps lie in D fit the links incident
      to k: (P[hi(D)] - P[lo(D)-1]) * bandwidth_into(k) >= sum bytes_t * p (with one binding
      tier, also the moves into F: n within [first, a_{i+1} - 1], o within [first, the live
      range's end]); D runs over each move's own window and two dyadic families of ranges
      (offsets 0 and half a range).
 (C9) after a_i, t stays in the binding tier or has a copy in F: usable there at a_i, or made by
      a move that the binding tier feeds to its end (the source lasts to a transfer's end,
      tiermap/ir/plan.py): s[t,i,k] + v[t,i,F] + sum_l e[t,i,l] >= 1; e[t,i,l] holds k over
      [a_i + 1, a_i + l] (C6) and moves within [first, a_i + u - 1] (C8); and it
      is one of the gap's moves into F: sum_l e[t,i,l] <= n[t,i,F].
Objective
 (O1) minimise P[n-1] = sum_s T[s].

Why it is a relaxation: take any valid plan and read y, v, s, p, n, e off it. (C1)-(C5) then hold
by the plan semantics, (C6) counts only bytes the plan holds, (C7) is each kernel's roofline, in
(C8) a step lasts at least each link's busy time, whether a move is made as one transfer or in
chunks (the link rows are fluid: they charge no spreading rule). In (C9), a tensor with a next
access ahead resides in k or in F at every step of the gap: if it does not stay in k it is
usable in F at a_i already, or its copy in F is made by a move whose source (k) lasts to its
end. For (A), read the merged tensor off the operand up to the alias op and off the result after
it: both reside in a common tier at the op's step, and counting their bytes once there only
lowers occupancy. Dropped terms only weaken it: tensors of at most TINY_TENSOR_BYTES
and tensors whose live range never meets a binding step are charged at their fastest tier with no
occupancy or moves.

The LP is solved by HiGHS (one thread, seeded, time-limited); the bound is its optimal value less a
relative 1e-6 for the solver's tolerances. If it does not reach optimality in time, no capacity
bound is returned and the caller keeps the knapsack bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tiermap.costmodel.roofline import compute_lower_bound_s, program_kernels
from tiermap.ir.plan import alias_pairs
from tiermap.ir.program import CONSTANT_KIND
from tiermap.mathopt import (
    WorkBudget,
    guard_fired,
    load_mathopt,
    quiet_stdout,
    solve_parameters,
)

if TYPE_CHECKING:
    from tiermap.hardware.target import Target
    from tiermap.ir.fusion import Fusion
    from tiermap.ir.program import Program

# Tensors this small are charged at their fastest tier with no occupancy (a relaxation).
TINY_TENSOR_BYTES = 4096
# Relative slack taken off the LP optimum for HiGHS's feasibility and optimality tolerances.
LP_TOLERANCE_SLACK = 1e-6
DEFAULT_TIME_LIMIT_S = 20.0
# (V6) an eviction's classes of how long the binding tier feeds it: [0, 1), [1, r), [r, r^2), ...
EVICT_CLASS_RATIO = 4


@dataclass(frozen=True)
class CapacityBound:
    """The LP bound and how it went.

    Attributes:
        bound_s: the bound in seconds, None if there is no binding tier or the LP was not solved.
        status: "solved", "no binding tier" or the solver's termination reason.
        wall_s: wall time of building and solving.
        detail: sizes and the binding tiers, for reports (nothing that depends on timing).
        guard_fired: the LP was stopped by its wall-clock limit, a guard: HiGHS solves an LP
            to optimality deterministically, so only a machine far slower than expected makes
            the bound depend on timing.
    """

    bound_s: float | None
    status: str
    wall_s: float
    detail: str
    guard_fired: bool = False


@dataclass
class _Access:
    step: int
    kernel: int
    read_bytes: float
    write_bytes: float


@dataclass(frozen=True)
class _Window:
    """Moves on the links of binding tier `tier` (its index in the LP's binding list) that lie
    within steps [lo, hi]: (variable, bytes) terms."""

    lo: int
    hi: int
    tier: int
    terms: list[tuple[Any, float]]


@dataclass(frozen=True)
class _Option:
    """A tier a tensor may use in the LP: a binding tier, the free tier F or the home tier R."""

    kind: str  # "B", "F" or "R"
    index: int  # the binding tier's index in `binding` ("B"), else -1
    read_bytes_per_s: float
    write_bytes_per_s: float


def capacity_lower_bound(program: Program, target: Target, fusion: Fusion | None = None,
                         time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0
                         ) -> CapacityBound:
    """Solve the capacity LP of the module docstring; see `CapacityBound`."""
    t_start = time.perf_counter()
    lp = _CapacityLp(program, target, fusion)
    if not lp.binding:
        return CapacityBound(None, "no binding tier", time.perf_counter() - t_start,
                             "no tier's capacity binds: the knapsack bound is the bound")
    lp.build()
    value_s, status, fired = lp.solve(time_limit_s, seed)
    wall_s = time.perf_counter() - t_start
    detail = (f"capacity LP over binding tier(s) {', '.join(lp.binding_names)}: "
              f"{lp.num_free} tensors free, {lp.model.get_num_variables()} variables, "
              f"{lp.model.get_num_linear_constraints()} rows")
    if value_s is None:
        return CapacityBound(None, status, wall_s, detail + f"; not solved ({status})", fired)
    return CapacityBound(value_s * (1.0 - LP_TOLERANCE_SLACK), "solved", wall_s, detail)


class _CapacityLp:
    def __init__(self, program: Program, target: Target, fusion: Fusion | None) -> None:
        self.program, self.target = program, target
        n = self.num_steps = program.num_steps
        res = target.residency_tiers or target.tiers[-1:]
        writable = [t for t in res if not t.read_only]
        homes = [t for t in res if t.read_only]
        kernels = program_kernels(program, fusion)
        compute = [compute_lower_bound_s(op, target) for op in program.ops]
        self.overhead_s = target.op_overhead_s
        # accesses per tensor, kernel of each step and its flop share
        self.weight = np.zeros(n)
        self.kernel_steps: list[tuple[int, ...]] = []
        self.kernel_compute_s: list[float] = []
        accesses: dict[str, dict[int, _Access]] = {}
        for j, k in enumerate(kernels):
            flops = [program.ops[s].flops for s in k.steps]
            total = sum(flops)
            for s, f in zip(k.steps, flops, strict=True):
                self.weight[s] = f / total if total > 0 else 1.0 / len(k.steps)
            self.kernel_steps.append(tuple(k.steps))
            self.kernel_compute_s.append(sum(compute[s] for s in k.steps))
            for entries, is_read in ((k.reads, True), (k.writes, False)):
                for vid, step, nbytes in entries:
                    if nbytes <= 0 or vid not in program.values:
                        continue
                    acc = accesses.setdefault(vid, {}).setdefault(step, _Access(step, j, 0.0, 0.0))
                    if is_read:
                        acc.read_bytes += nbytes
                    else:
                        acc.write_bytes += nbytes
        ranges = self._merge_alias_buffers(accesses, fusion)
        self.accesses = {vid: sorted(a.values(), key=lambda a: a.step)
                         for vid, a in accesses.items() if program.values[vid].nbytes > 0}
        inputs = set(program.inputs)
        constants = {v for op in program.ops if op.kind == CONSTANT_KIND for v in op.outputs}
        self.home_eligible = inputs | constants
        # binding tiers: the live tensors that fit exceed the capacity at some step
        self.binding: list[int] = []  # indices into `writable`
        self.pressure: list[np.ndarray] = []
        self.ranges = {vid: ranges.get(vid) or program.live_range(vid) for vid in self.accesses}
        for i, tier in enumerate(writable):
            diff = np.zeros(n + 1)
            for vid, (lo, hi) in self.ranges.items():
                nbytes = program.values[vid].nbytes
                if nbytes <= tier.capacity_bytes:
                    diff[lo] += nbytes
                    diff[hi + 1] -= nbytes
            over = np.cumsum(diff[:n]) > tier.capacity_bytes
            if n and over.any():
                self.binding.append(i)
                self.pressure.append(over)
        self.writable, self.homes = writable, homes
        self.binding_names = [writable[i].name for i in self.binding]
        self.capacity_bytes = [float(writable[i].capacity_bytes) for i in self.binding]
        others = [t for i, t in enumerate(writable) if i not in self.binding]
        self.others, self.res = others, res
        self.num_free = 0
        # links incident to each binding tier: their total bandwidth
        names = [t.name for t in res]
        self.link_bytes_per_s: list[float] = []
        for i in self.binding:
            name = writable[i].name
            bws = [target.link_bytes_per_s(q, name) for q in names if q != name] or [math.inf]
            self.link_bytes_per_s.append(sum(bws))

    def _merge_alias_buffers(self, accesses: dict[str, dict[int, _Access]],
                             fusion: Fusion | None) -> dict[str, tuple[int, int]]:
        """(A) an alias op's result whose operand dies at the op is the operand's buffer under
        another name: fold the result's accesses into the operand's (transitively, into the first
        buffer of the chain) and return the merged live ranges."""
        program = self.program
        internal = program.unstored | (
            fusion.unmaterialized() if fusion is not None else frozenset())
        root_of: dict[str, str] = {}
        ranges: dict[str, tuple[int, int]] = {}
        for op in program.ops:
            for x, y in alias_pairs(op.kind, op.inputs, op.outputs):
                if (x in internal or y in internal or x not in program.values
                        or y not in program.values
                        or program.values[x].nbytes != program.values[y].nbytes
                        or program.last_use_step(x) != op.step):
                    continue
                root = root_of[y] = root_of.get(x, x)
                lo, hi = ranges.get(root) or program.live_range(root)
                ranges[root] = (lo, max(hi, program.live_range(y)[1]))
                moved = accesses.pop(y, {})
                into = accesses.setdefault(root, {}) if moved else {}
                for step, acc in moved.items():
                    if step in into:
                        into[step].read_bytes += acc.read_bytes
                        into[step].write_bytes += acc.write_bytes
                    else:
                        into[step] = acc
        return ranges

    # --- tiers of one tensor --------------------------------------------------------------------

    def options(self, vid: str) -> list[_Option]:
        nbytes = self.program.values[vid].nbytes
        out = [_Option("B", b, self.writable[i].read_bytes_per_s,
                       self.writable[i].write_bytes_per_s)
               for b, i in enumerate(self.binding) if self.writable[i].capacity_bytes >= nbytes]
        fits = [t for t in self.others if t.capacity_bytes >= nbytes]
        if fits:
            out.append(_Option("F", -1, max(t.read_bytes_per_s for t in fits),
                               max(t.write_bytes_per_s for t in fits)))
        homes = [t for t in self.homes if t.capacity_bytes >= nbytes]
        if homes and vid in self.home_eligible:
            out.append(_Option("R", -1, max(t.read_bytes_per_s for t in homes),
                               max(t.write_bytes_per_s for t in homes)))
        return out

    def under_pressure(self, vid: str, opts: Sequence[_Option]) -> bool:
        lo, hi = self.ranges[vid]
        return any(o.kind == "B" and bool(self.pressure[o.index][lo:hi + 1].any()) for o in opts)

    # --- the model ------------------------------------------------------------------------------

    def build(self) -> None:
        mathopt = load_mathopt()

        self.mo = mathopt
        m = self.model = mathopt.Model(name="capacity-bound")
        n = self.num_steps
        # constant parts: each kernel's memory time of the fixed tensors
        const_mem_s = [0.0] * len(self.kernel_steps)
        mem_terms: list[list[tuple[Any, float]]] = [[] for _ in self.kernel_steps]
        occ_terms: list[list[tuple[Any, float, int, int]]] = [[] for _ in self.binding]
        const_occ = [np.zeros(n + 1) for _ in self.binding]
        windows: list[_Window] = []
        opts_of = {vid: self.options(vid) for vid in self.accesses}
        for vid, accs in self.accesses.items():
            opts = opts_of[vid]
            nbytes = float(self.program.values[vid].nbytes)
            if not opts:
                continue  # fits nowhere: planning raises InfeasiblePlacementError first
            free = (len(opts) > 1 and nbytes > TINY_TENSOR_BYTES
                    and self.under_pressure(vid, opts))
            if not free:
                best = opts
                if len(opts) == 1 and opts[0].kind == "B" and nbytes > TINY_TENSOR_BYTES:
                    lo, hi = self.ranges[vid]  # forced into a binding tier: constant occupancy
                    const_occ[opts[0].index][lo] += nbytes
                    const_occ[opts[0].index][hi + 1] -= nbytes
                for a in accs:
                    const_mem_s[a.kernel] += (
                        a.read_bytes / max(o.read_bytes_per_s for o in best)
                        + a.write_bytes / max(o.write_bytes_per_s for o in best))
                continue
            self.num_free += 1
            self._tensor(vid, accs, opts, nbytes, mem_terms, occ_terms, windows)
        self.tu_s = self._time_unit(const_mem_s)
        T = self._kernels(const_mem_s, mem_terms)  # (V5), (C7)
        for b in range(len(self.binding)):  # (C6)
            self._capacity(b, occ_terms[b], np.cumsum(const_occ[b][:n]))
        P = self._prefix(T)
        self._links(P, windows)  # (C8)
        m.minimize(P[n - 1])  # (O1)

    def _var(self) -> Any:
        return self.model.add_variable(lb=0.0, ub=1.0)

    def _tensor(self, vid: str, accs: Sequence[_Access], opts: Sequence[_Option], nbytes: float,
                mem_terms: list[list[tuple[Any, float]]],
                occ_terms: list[list[tuple[Any, float, int, int]]],
                windows: list[_Window]) -> None:
        mo, m = self.mo, self.model
        lo, _hi = self.ranges[vid]
        produced = accs[0].write_bytes > 0 and self.program.values[vid].producer_step >= 0
        has_home = any(o.kind == "R" for o in opts)
        movable = [o for o in opts if o.kind != "R"]  # tiers with v variables
        free_tier = next((o for o in movable if o.kind == "F"), None)
        first_move = lo + 1 if produced else lo  # copies start after the write (plan.py)
        steps = [a.step for a in accs]
        virtual = not produced and lo < steps[0]
        if virtual:
            steps = [lo, *steps]
        num = len(steps)
        first_real = 1 if virtual else 0
        v = [{o: self._var() for o in movable} for _ in range(num)]
        if virtual and not has_home:  # (C5) the input is somewhere at the start
            m.add_linear_constraint(lb=1.0, expr=mo.fast_sum(v[0].values()))
        for i in range(first_real, num):
            a = accs[i - first_real]
            y = {o: self._var() for o in opts
                 if not (o.kind == "R" and a.write_bytes > 0 and vid not in self.home_eligible)}
            m.add_linear_constraint(lb=1.0, ub=1.0, expr=mo.fast_sum(y.values()))  # (C1)
            for o, yo in y.items():
                mem_terms[a.kernel].append(
                    (yo, a.read_bytes / o.read_bytes_per_s + a.write_bytes / o.write_bytes_per_s))
                if o.kind != "R":
                    m.add_linear_constraint(ub=0.0, expr=yo - v[i][o])
                    if produced and i == 0:  # (C2)
                        m.add_linear_constraint(ub=0.0, expr=v[i][o] - yo)
        for i in range(num):
            for o in movable:
                if o.kind == "B":
                    occ_terms[o.index].append((v[i][o], nbytes, steps[i], steps[i]))
        # moves into F are on links incident to the binding tier when it is the only one and
        # there is no home (their source is that tier): (C5) and the link rows count them
        single = free_tier is not None and not has_home and len(self.binding) == 1
        into_f: list[Any] = []
        lead_sums: list[list[Any]] = []
        f_first = sorted(movable, key=lambda o: o.kind != "F")  # F's move first, for (C9)
        for i in range(num - 1):
            a_i, a_next = steps[i], steps[i + 1]
            n_f = None
            for o in f_first:
                if o.kind == "F":  # (C3) for F: held since a_i or moved in since
                    # it ends before a_next and starts after the write
                    n_f = m.add_variable(lb=0.0, ub=1.0 if first_move < a_next else 0.0)
                    m.add_linear_constraint(ub=0.0, expr=v[i + 1][o] - v[i][o] - n_f)
                    into_f.append(n_f)
                    if single and first_move < a_next:
                        windows.append(_Window(first_move, a_next - 1, 0, [(n_f, nbytes)]))
                    continue
                stay = self._var()  # (V3), (C4)
                m.add_linear_constraint(ub=0.0, expr=stay - v[i][o])
                if a_next > a_i + 1:
                    occ_terms[o.index].append((stay, nbytes, a_i + 1, a_next - 1))
                leads = self._lead_options(o, nbytes, first_move, a_next, occ_terms, windows)
                m.add_linear_constraint(  # (C3)
                    ub=0.0, expr=v[i + 1][o] - stay - mo.fast_sum(leads))
                lead_sums.append(leads)
                if single and free_tier is not None and n_f is not None:  # (C9)
                    evicts = self._evict_options(o, nbytes, first_move, a_i, a_next, occ_terms,
                                                 windows)
                    m.add_linear_constraint(lb=1.0, expr=stay + v[i][free_tier]
                                            + mo.fast_sum(evicts))
                    m.add_linear_constraint(ub=0.0, expr=mo.fast_sum(evicts) - n_f)
        if single and free_tier is not None:
            # (C5) a move into the binding tier needs a copy in F: written or given there, or
            # moved there (ending in some gap, or later: `tail`)
            last = self.ranges[vid][1]
            tail = m.add_variable(lb=0.0, ub=1.0 if first_move <= last else 0.0)
            if first_move <= last:
                windows.append(_Window(first_move, last, 0, [(tail, nbytes)]))
            for leads in lead_sums:
                m.add_linear_constraint(ub=0.0, expr=mo.fast_sum(leads) - tail
                                        - mo.fast_sum(into_f) - v[0][free_tier])

    def _lead_options(self, o: _Option, nbytes: float, first_move: int, a_next: int,
                      occ_terms: list[list[tuple[Any, float, int, int]]],
                      windows: list[_Window]) -> list[Any]:
        """(V4) the move into binding tier o that makes t usable at a_next, by its lead L (steps
        from the move's start r to a_next): option [l, u) for l = 1, 2, 4, ... holds o over
        [a_next - l, a_next - 1] and moves within [a_next - u + 1, a_next - 1]. A lead of the
        whole gap or more means the move was under way at a_i (had it ended, t would have been
        usable at a_i and stayed); it may have started as early as `first_move` (the live
        range's start, a step later for a produced tensor)."""
        most = a_next - first_move
        out = []
        lead = 1
        while lead <= most:
            upper = min(2 * lead, most + 1)
            var = self._var()
            occ_terms[o.index].append((var, nbytes, a_next - lead, a_next - 1))
            windows.append(_Window(a_next - upper + 1, a_next - 1, o.index, [(var, nbytes)]))
            out.append(var)
            lead = upper
        return out

    def _evict_options(self, o: _Option, nbytes: float, first_move: int, a_i: int, a_next: int,
                       occ_terms: list[list[tuple[Any, float, int, int]]],
                       windows: list[_Window]) -> list[Any]:
        """(V6) t leaves binding tier o in the gap after a_i with its copy in F made by a move
        that ends L steps after a_i (o feeds the move to its end, so it holds t over
        [a_i + 1, a_i + L]): option [l, u) for l = 0, 1, r, r², ... (r = EVICT_CLASS_RATIO)
        holds o over [a_i + 1, a_i + l] and moves within [first_move, a_i + u - 1];
        L <= a_next - a_i - 1."""
        most = a_next - a_i - 1
        out = []
        lead = 0
        while lead <= most:
            upper = min(max(EVICT_CLASS_RATIO * lead, 1), most + 1)
            hi = a_i + upper - 1
            if hi >= first_move:  # a move that ends before its earliest start is no option
                var = self._var()
                if lead > 0:
                    occ_terms[o.index].append((var, nbytes, a_i + 1, a_i + lead))
                windows.append(_Window(first_move, hi, o.index, [(var, nbytes)]))
                out.append(var)
            lead = upper
        return out

    def _time_unit(self, const_mem_s: Sequence[float]) -> float:
        total = sum(max(c, mm) + self.overhead_s
                    for c, mm in zip(self.kernel_compute_s, const_mem_s, strict=True))
        return max(total / max(self.num_steps, 1), 1e-15)

    def _kernels(self, const_mem_s: Sequence[float],
                 mem_terms: Sequence[Sequence[tuple[Any, float]]]) -> list[Any]:
        """(V5), (C7)."""
        m, tu = self.model, self.tu_s
        T = [None] * self.num_steps
        ovh = self.overhead_s
        for j, steps in enumerate(self.kernel_steps):
            floor_s = max(self.kernel_compute_s[j], const_mem_s[j]) + ovh
            for st in steps:
                T[st] = m.add_variable(lb=self.weight[st] * floor_s / tu)
            if not mem_terms[j]:
                continue
            expr = self.mo.fast_sum(c / tu * var for var, c in mem_terms[j])
            const = (const_mem_s[j] + ovh) / tu
            if len(steps) == 1:
                m.add_linear_constraint(lb=const, expr=T[steps[0]] - expr)
            else:
                mj = m.add_variable(lb=floor_s / tu)
                m.add_linear_constraint(lb=const, expr=mj - expr)
                for st in steps:
                    m.add_linear_constraint(lb=0.0, expr=T[st] - self.weight[st] * mj)
        return T

    def _prefix(self, T: Sequence[Any]) -> list[Any]:
        m = self.model
        P: list[Any] = []
        for st, t in enumerate(T):
            p = m.add_variable(lb=0.0)
            m.add_linear_constraint(lb=0.0, ub=0.0, expr=p - t - (P[st - 1] if st else 0.0))
            P.append(p)
        return P

    def _capacity(self, b: int, terms: Sequence[tuple[Any, float, int, int]],
                  const: np.ndarray) -> None:
        """(C6) as a chain O[s] = O[s'] + terms started - terms ended, with a row at every step
        where a term starts inside the tier's binding steps (occupancy only grows there)."""
        m, n = self.model, self.num_steps
        cap = self.capacity_bytes[b]
        scale = cap / 1e3
        starts: dict[int, list[tuple[Any, float]]] = {}
        ends: dict[int, list[tuple[Any, float]]] = {}
        for var, nbytes, lo, hi in terms:
            starts.setdefault(lo, []).append((var, nbytes / scale))
            ends.setdefault(hi + 1, []).append((var, nbytes / scale))
        pressure = self.pressure[b]
        prev = None
        pending: list[tuple[Any, float]] = []
        grows = set(np.flatnonzero(np.diff(const, prepend=0.0) > 0).tolist())
        for st in sorted((set(starts) | set(ends) | grows) - {n}):
            pending.extend(starts.get(st, []))
            pending.extend((var, -c) for var, c in ends.get(st, []))
            if not pressure[st] or (st not in starts and st not in grows):
                continue
            cur = m.add_variable(lb=-math.inf, ub=(cap - const[st]) / scale)
            m.add_linear_constraint(lb=0.0, ub=0.0, expr=cur - (prev if prev is not None else 0.0)
                                    - self.mo.fast_sum(c * var for var, c in pending))
            prev, pending = cur, []

    def _links(self, P: Sequence[Any], windows: Sequence[_Window]) -> None:
        """(C8) over each move's own window and two dyadic families of step ranges (offset 0 and
        half a range)."""
        m, tu, n = self.model, self.tu_s, self.num_steps
        rows: dict[tuple[int, int, int, int], list[_Window]] = {}
        for w in windows:
            size = 1
            while size < w.hi - w.lo + 1:
                size *= 2
            while True:
                for off in ((0,) if size == 1 else (0, size // 2)):
                    if w.lo < off:
                        continue
                    idx = (w.lo - off) // size
                    if w.hi <= idx * size + off + size - 1:
                        rows.setdefault((size, off, idx, w.tier), []).append(w)
                if size >= n:
                    break
                size *= 2
        for w in windows:  # each move alone within its own window
            lo, hi = w.lo, w.hi
            span = P[hi] - (P[lo - 1] if lo > 0 else 0.0)
            bw = self.link_bytes_per_s[w.tier]
            m.add_linear_constraint(lb=0.0, expr=span - self.mo.fast_sum(
                nb / bw / tu * var for var, nb in w.terms))
        for (size, off, idx, b), ws in sorted(rows.items(), key=lambda kv: kv[0]):
            lo = idx * size + off
            hi = min(lo + size - 1, n - 1)
            span = P[hi] - (P[lo - 1] if lo > 0 else 0.0)
            bw = self.link_bytes_per_s[b]
            m.add_linear_constraint(lb=0.0, expr=span - self.mo.fast_sum(
                nb / bw / tu * var for w in ws for var, nb in w.terms))

    # --- solve ----------------------------------------------------------------------------------

    def solve(self, time_limit_s: float, seed: int) -> tuple[float | None, str, bool]:
        """(bound in seconds or None, status, whether the wall-clock guard stopped it). An LP
        has no work limit to set: HiGHS solves it to optimality, deterministically."""
        mo = self.mo
        params = solve_parameters("highs", seed, 1, WorkBudget(None, 0.0, time_limit_s))
        with quiet_stdout():
            result = mo.solve(self.model, mo.SolverType.HIGHS, params=params)
        reason = result.termination.reason
        if reason != mo.TerminationReason.OPTIMAL:
            return None, reason.name.lower(), guard_fired(result)
        bound = result.termination.objective_bounds.dual_bound
        if not math.isfinite(bound):
            bound = result.objective_value()
        return float(bound) * self.tu_s, "solved", False
