"""Which stored tensors to recompute: the candidates and the selection MIP.

A candidate is a stored tensor (after fusion) whose longest idle span, between two accesses, is
at least MIN_IDLE_STEPS steps, and that can be computed again just before the access that ends
it: walking back from its producer through ops of RECOMPUTABLE kinds (elementwise,
transcendental, data movement, reductions, matrix products: at most MAX_CHAIN_OPS of them), every
tensor reached is either live at that access (a program input still read later, or a stored
tensor whose live range covers the access, produced before it) or is computed again too. A
deeper chain of the same tensor also computes again those of its inputs that are candidates
dropped at that step (up to DEEP_LEVELS levels, a chain per level), so that both can go.
Convolutions, loops, custom calls, gathers, scatters and collectives are never repeated, nor are
the ops of attention groups (their backward already recomputes the scores,
fusion/attention.py). A matrix product is repeated only where the MIP finds nothing cheaper:
its cost is in the objective.

The selection MIP (OR-tools MathOpt, HiGHS). "Device" memory is the writable tiers up to the
target's main-memory tier, "host" memory the writable tiers after it.

Variables
 (V1) r[c] in {0,1}: candidate c is recomputed: its bytes b_c leave device memory over its idle
      span, and its recomputation costs t_c seconds (its ops as one fused kernel: max(compute,
      bytes of its inputs and result / main-tier bandwidth) + the op overhead).
 (V2) o[g] in [0,1] (mode "auto", with a host tier): gap g of a stored tensor (an idle span of
      at least MIN_OFFLOAD_STEPS steps) is moved to host memory and back; it costs what its two
      transfers cannot hide behind the compute of the gap's steps (the fused kernels' times
      with every tensor in main memory): c_g = max(0, 2 b_g / link bandwidth - compute_g).
 (V3) E >= 0: link time beyond the whole program's estimated compute.
 (V4) F[i] >= 0: bytes freed from device memory in the i-th interval between span ends; S[i] >= 0
      the bytes still over capacity there.

Constraints
 (C1) F[i] = F[i-1] + sum b * (spans starting in interval i) - sum b * (spans ended before it)
      (an option's variable times its bytes, over its span: sparse, two rows an option).
 (C2) live_i - F[i] + sum_c h_c r[c] <= device capacity + S[i], live_i the peak device bytes
      in interval i with nothing recomputed or offloaded, h_c the other results of the chains
      that run at the interval's first step (rows only where the interval can be over).
 (C3) r[c] + r[c'] <= 1 where c' is an input of c's recomputation that c' itself would drop
      at that step.
 (C4) E >= sum_g 2 b_g / bandwidth * o[g] - estimated compute of the program.

Objective: minimise sum t_c r[c] + sum c_g o[g] + E + OVERFLOW_PENALTY * sum S[i] (each term in
units of the program's estimated time; S in bytes of device capacity). The slack keeps the
problem feasible where nothing fits: then placement reports the overflow as it does today.

Offload is only priced here: the placement MIP (placement/) decides the moves of the rewritten
program. The solve stops at NODE_LIMIT branch-and-bound nodes (deterministic), with a wall-clock
guard, a seed and one thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tiermap.costmodel.roofline import compute_time_s, program_kernels
from tiermap.hardware.target import Target
from tiermap.ir.fusion import Fusion
from tiermap.ir.ops import ELEMENTWISE, MOVEMENT, TRANSCENDENTAL
from tiermap.ir.program import Program
from tiermap.ir.untaken import Untaken
from tiermap.mathopt import WorkBudget, guard_fired, load_mathopt, quiet_stdout, solve_parameters
from tiermap.passes.base import Liveness

RECOMPUTABLE = (ELEMENTWISE | TRANSCENDENTAL | {"reduce", "constant", "dot_general"}
                | (MOVEMENT - {"dynamic_update_slice", "gather", "after_all", "create_token",
                               "partition_id", "replica_id", "optimization_barrier", "tuple",
                               "get_tuple_element"}))
# An idle span shorter than this is not worth a recomputation.
MIN_IDLE_STEPS = 8
# A gap that could hold an eviction and a prefetch.
MIN_OFFLOAD_STEPS = 3
# Deeper chains: those that also compute again up to this many levels of inputs that are
# themselves dropped at the read.
DEEP_LEVELS = 2
# At most this many ops are repeated for one tensor.
MAX_CHAIN_OPS = 64
# Tensors smaller than this are neither recomputed nor priced for offload.
MIN_TENSOR_BYTES = 64 * 1024
NODE_LIMIT = 200
# In a selection's note where offload was priced beside recomputation (the pipeline then also
# plans the recompute-only selection and keeps the faster plan: offload is only estimated here).
OFFLOAD_WEIGHED = "offload gaps priced"
# The solve stops within this relative gap of its bound.
RELATIVE_GAP = 1e-3
# Objective weight of one device-capacity's worth of bytes left over capacity, in units of the
# program's estimated time: an overflow costs far more than any recomputation.
OVERFLOW_PENALTY = 1e4


@dataclass(frozen=True)
class Candidate:
    """A tensor that can be recomputed at `at_step` (the old program's step of the read that
    ends its longest idle span). `chain`: the ops repeated, in step order (the last writes
    `tensor`); `inputs`: what they read that they do not write; `transient_bytes`: what
    its other results hold while it runs (those that fusion kept in memory the first time)."""

    tensor: str
    at_step: int
    idle: tuple[int, int]
    chain: tuple[int, ...]
    inputs: tuple[str, ...]
    nbytes: int
    time_s: float
    transient_bytes: int = 0


@dataclass(frozen=True)
class Selection:
    chosen: tuple[Candidate, ...]
    status: str
    detail: str
    over_bytes: int
    guard_fired: bool = False


def _short(kind: str) -> str:
    return kind.removeprefix("stablehlo.").removeprefix("mhlo.")


def stored_values(program: Program, fusion: Fusion) -> frozenset[str]:
    """Tensors some tier holds: not fused away, not unstored."""
    gone = fusion.unmaterialized() | program.unstored
    return frozenset(v for v in program.values if v not in gone)


def device_tiers(target: Target) -> tuple[list[int], list[int]]:
    """(device tier indices, host tier indices) among the writable residency tiers."""
    main = target.tiers.index(target.main_tier)
    writable = [i for i, t in enumerate(target.tiers) if t.holds_tensors and not t.read_only]
    return [i for i in writable if i <= main], [i for i in writable if i > main]


def candidates(program: Program, target: Target, fusion: Fusion, live: Liveness
               ) -> list[Candidate]:
    """Every tensor that can be recomputed after its longest idle span (module docstring):
    for each, the chain that reads what is live at its read; and where one of those inputs is
    itself a candidate dropped at that step, deeper chains that compute that input again too
    (so both can be dropped), one per level up to DEEP_LEVELS."""
    stored = stored_values(program, fusion)
    attention_ops = {oid for g in fusion.groups if g.kind.startswith("attention")
                     for oid in g.op_ids}
    outputs = set(program.outputs)
    inputs = set(program.inputs)
    spans: dict[str, tuple[int, int, int]] = {}  # tensor -> (idle first, idle last, read step)
    for vid in sorted(stored):
        value = program.values[vid]
        if vid in outputs or vid in inputs or value.nbytes < MIN_TENSOR_BYTES:
            continue
        acc = live.accesses[vid]
        if len(acc) < 2:
            continue
        length, a, at = max((b - a, a, b) for a, b in zip(acc, acc[1:], strict=False))
        if length - 1 >= MIN_IDLE_STEPS:
            spans[vid] = (a + 1, at - 1, at)
    out: list[Candidate] = []
    for vid, (lo, hi, at) in spans.items():
        shallow = _chain(program, vid, at, stored, attention_ops, live, {})
        if shallow is not None:
            out.append(_candidate(program, target, vid, (lo, hi), at, shallow, stored))
        seen = {shallow}
        for levels in range(1, DEEP_LEVELS + 1):
            deep = _chain(program, vid, at, stored, attention_ops, live, spans, levels)
            if deep is not None and deep not in seen:
                seen.add(deep)
                out.append(_candidate(program, target, vid, (lo, hi), at, deep, stored))
    return sorted(out, key=lambda c: (c.at_step, program.values[c.tensor].producer_step,
                                      len(c.chain)))


def _candidate(program: Program, target: Target, vid: str, idle: tuple[int, int], at: int,
               chain: tuple[int, ...], stored: frozenset[str]) -> Candidate:
    made = {o for s in chain for o in program.ops[s].outputs}
    leaves = tuple(dict.fromkeys(u for s in chain for u in program.ops[s].inputs
                                 if u not in made))
    ops = [program.ops[s] for s in chain]
    main = target.main_tier
    compute = sum(compute_time_s(op, target) for op in ops)
    mem = (sum(program.values[u].nbytes for u in leaves) / main.read_bytes_per_s
           + program.values[vid].nbytes / main.write_bytes_per_s)
    # the chain's other results that fusion kept in memory the first time (the others are
    # expected to fuse again)
    transient = sum(program.values[o].nbytes for op in ops for o in op.outputs
                    if o != vid and o in stored)
    return Candidate(vid, at, idle, chain, leaves, program.values[vid].nbytes,
                     max(compute, mem) + target.op_overhead_s, transient)


def _chain(program: Program, vid: str, at: int, stored: frozenset[str],
           attention_ops: set[str], live: Liveness,
           dropped: Mapping[str, tuple[int, int, int]], levels: int = 0
           ) -> tuple[int, ...] | None:
    """Steps of the ops to repeat before step `at` to compute `vid` again, or None. A tensor
    live at `at` is read as it is, unless `dropped` has it idle there and `levels` is not spent:
    then it is made again too, from what is live at `at` (each such input spends a level)."""
    inputs = set(program.inputs)
    steps: set[int] = set()
    todo = [(vid, levels)]
    while todo:
        u, deep = todo.pop()
        first, last = live.ranges[u]
        held = u != vid and u in stored and first < at <= last
        idle = dropped.get(u) if deep else None
        if held and (idle is None or not idle[0] <= at - 1 <= idle[1]):
            continue  # live at the read: a leaf
        p = program.values[u].producer_step
        if u in inputs or p < 0:
            return None  # an input no longer held cannot be made again
        if p in steps:
            continue
        op = program.ops[p]
        if (_short(op.kind) not in RECOMPUTABLE or op.body or len(op.outputs) != 1
                or op.id in attention_ops):
            return None
        steps.add(p)
        if len(steps) > MAX_CHAIN_OPS:
            return None
        todo.extend((w, deep - 1 if held else deep) for w in op.inputs)
    return tuple(sorted(steps))


def _est_op_s(program: Program, target: Target, fusion: Fusion) -> np.ndarray:
    """Each step's share of its kernel's time (fused as `fusion` says) with every tensor in the
    main-memory tier: the compute that transfers can hide (placement estimates it the same)."""
    main = target.main_tier
    out = np.zeros(program.num_steps, dtype=float)
    for k in program_kernels(program, fusion):
        compute = sum(compute_time_s(program.ops[s], target) for s in k.steps)
        mem = (sum(b for _v, _s, b in k.reads) / main.read_bytes_per_s
               + sum(b for _v, _s, b in k.writes) / main.write_bytes_per_s)
        flops = [program.ops[s].flops for s in k.steps]
        total = sum(flops)
        for s, f in zip(k.steps, flops, strict=True):
            out[s] = (max(compute, mem) + target.op_overhead_s) * (
                f / total if total > 0 else 1.0 / len(k.steps))
    return out


def select(program: Program, target: Target, fusion: Fusion, live: Liveness, mode: str,
           guard_s: float, seed: int = 0, untaken: Untaken | None = None) -> Selection:
    """The recomputations that relieve device memory best (module docstring); `mode` "auto"
    prices offload beside them (with a host tier), "fit" recomputes without that choice.
    `untaken`: tensors the applied program does not recompute (not candidates) or whose host
    moves it does not place (offload not weighed for them)."""
    untaken = untaken if untaken is not None else Untaken()
    n = program.num_steps
    dev, host = device_tiers(target)
    cap = int(sum(target.tiers[i].capacity_bytes for i in dev))
    stored = stored_values(program, fusion)
    delta = np.zeros(n + 1, dtype=np.int64)
    for vid in stored:
        first, last = live.ranges[vid]
        delta[first] += program.values[vid].nbytes
        delta[last + 1] -= program.values[vid].nbytes
    live_b = np.cumsum(delta[:n]) if n else np.zeros(0, dtype=np.int64)
    over = live_b > cap
    if not over.any():
        return Selection((), "optimal", "device memory holds the program: nothing to recompute",
                         0)
    cands = [c for c in candidates(program, target, fusion, live)
             if over[c.idle[0]:c.idle[1] + 1].any()
             and untaken.may_recompute(program.name, c.tensor)]
    est = _est_op_s(program, target, fusion)
    total_s = float(est.sum()) or 1.0
    cum = np.concatenate([[0.0], np.cumsum(est)])
    gaps: list[tuple[str, int, int, float]] = []  # (tensor, first, last, cost in s)
    if mode == "auto" and host:
        main = target.main_tier.name
        bw = max(target.link_bytes_per_s(main, target.tiers[host[0]].name), 1.0)
        for vid in sorted(stored):
            b = program.values[vid].nbytes
            if b < MIN_TENSOR_BYTES or untaken.device_only(program.name, vid):
                continue
            acc = list(live.accesses[vid])
            first, last = live.ranges[vid]
            if vid in program.inputs:
                acc = [first - 1, *acc] if acc and acc[0] > first else acc
            if vid in program.outputs:
                acc = [*acc, last + 1]
            for a, z in zip(acc, acc[1:], strict=False):
                lo, hi = a + 1, z - 1
                if hi - lo + 1 >= MIN_OFFLOAD_STEPS and over[lo:hi + 1].any():
                    hide = float(cum[hi + 1] - cum[lo])
                    gaps.append((vid, lo, hi, max(0.0, 2.0 * b / bw - hide)))
    else:
        bw = 1.0
    if not cands and not gaps:
        return Selection((), "optimal", "no tensor can be recomputed where device memory is "
                         "short", int((live_b - cap).max()))
    # The options (recompute chains, then offload gaps): span, bytes, cost in units of total_s.
    spans = [(c.idle[0], c.idle[1], c.nbytes, c.time_s / total_s) for c in cands]
    spans += [(g[1], g[2], program.values[g[0]].nbytes, g[3] / total_s) for g in gaps]
    link_s = [0.0] * len(cands) + [2.0 * program.values[g[0]].nbytes / bw / total_s
                                    for g in gaps]
    cuts = sorted({0, n} | {s for lo, hi, _b, _c in spans for s in (lo, hi + 1)})
    where = {c: i for i, c in enumerate(cuts)}
    cover = [(where[lo], where[hi + 1]) for lo, hi, _b, _c in spans]
    # a chain's other results, held at its read step (the interval that starts there)
    extra = [(where[c.at_step], c.transient_bytes) for c in cands] + [(0, 0)] * len(gaps)
    peak = np.array([int(live_b[lo:hi].max()) if hi > lo else 0
                     for lo, hi in zip(cuts, cuts[1:], strict=False)], dtype=np.int64)
    # (C3) pairs that exclude each other: chains of one tensor; a chain and its dropped input
    variants: dict[str, list[int]] = {}
    for i, c in enumerate(cands):
        variants.setdefault(c.tensor, []).append(i)
    pairs = [(i, j) for vs in variants.values() for i in vs for j in vs if i < j]
    for i, c in enumerate(cands):
        for u in c.inputs:
            pairs += [(i, j) for j in variants.get(u, ())
                      if cands[j].idle[0] <= c.at_step - 1 <= cands[j].idle[1]]
    start = _greedy(spans, cover, extra, peak, cap, pairs, link_s)
    chosen_idx, status, detail, fired = _solve(spans, cover, extra, peak, cap, pairs, link_s,
                                               start, len(cands), guard_s, seed)
    freed = _freed(chosen_idx, spans, cover, extra, len(peak))
    left = int(max((peak - freed - cap).max(), 0))
    chosen = tuple(cands[i] for i in sorted(chosen_idx) if i < len(cands))
    weighed = f", {len(gaps)} {OFFLOAD_WEIGHED}" if gaps else ""
    return Selection(chosen, status, f"recompute MIP ({len(cands)} candidates{weighed}): "
                     f"{detail}", left, fired)


def _freed(chosen: set[int], spans: list[tuple[int, int, int, float]],
           cover: list[tuple[int, int]], extra: list[tuple[int, int]], num: int) -> np.ndarray:
    """Bytes the options `chosen` free in each interval (less the chains' transients)."""
    freed = np.zeros(num, dtype=np.int64)
    for i in chosen:
        freed[cover[i][0]:cover[i][1]] += spans[i][2]
        if extra[i][1] and extra[i][0] < num:
            freed[extra[i][0]] -= extra[i][1]
    return freed


def _greedy(spans: list[tuple[int, int, int, float]], cover: list[tuple[int, int]],
            extra: list[tuple[int, int]], peak: np.ndarray, cap: int,
            pairs: list[tuple[int, int]], link_s: list[float]) -> set[int]:
    """A first selection: while some interval is over capacity, the option that frees the most
    of what is over per unit of cost (an offload costs its link time beyond the compute left to
    hide it); then drop chosen options, costliest first, that are not needed."""
    over = (peak - cap).astype(float)
    banned: dict[int, set[int]] = {}
    for i, j in pairs:
        banned.setdefault(i, set()).add(j)
        banned.setdefault(j, set()).add(i)
    chosen: set[int] = set()
    blocked: set[int] = set()
    hide = 1.0  # the program's compute, in units of itself, not yet filled with transfers
    while (over > 0).any():
        best, best_score = -1, 0.0
        for i, (_lo, _hi, b, cost) in enumerate(spans):
            if i in chosen or i in blocked:
                continue
            ia, ib = cover[i]
            gain = float(np.minimum(np.maximum(over[ia:ib], 0.0), b).sum())
            k, t = extra[i]
            if t and k < len(over):
                gain -= float(max(over[k] + t, 0.0) - max(over[k], 0.0))
            if gain <= 0.0:
                continue
            score = gain / (cost + max(link_s[i] - max(hide, 0.0), 0.0) + 1e-9)
            if score > best_score:
                best, best_score = i, score
        if best < 0:
            break
        chosen.add(best)
        blocked |= banned.get(best, set())
        hide -= link_s[best]
        over -= _freed({best}, spans, cover, extra, len(over))
    for i in sorted(chosen, key=lambda i: -spans[i][3]):
        back = over + _freed({i}, spans, cover, extra, len(over))
        if ((back <= 0) | (back <= over)).all():
            chosen.discard(i)
            over = back
    return chosen


def _solve(spans: list[tuple[int, int, int, float]], cover: list[tuple[int, int]],
           extra: list[tuple[int, int]], peak: np.ndarray, cap: int,
           pairs: list[tuple[int, int]], link_s: list[float],
           start: set[int], num_r: int, guard_s: float, seed: int
           ) -> tuple[set[int], str, str, bool]:
    """The MIP of the module docstring, warm-started from `start`; the better of the two."""
    mo = load_mathopt()
    model = mo.Model(name="recompute")
    x = [model.add_binary_variable(name=f"r{i}") if i < num_r
         else model.add_variable(lb=0.0, ub=1.0, name=f"o{i}") for i in range(len(spans))]
    hint: dict[object, float] = {v: float(i in start) for i, v in enumerate(x)}
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    for i, (ia, ib) in enumerate(cover):
        starts.setdefault(ia, []).append(i)
        ends.setdefault(ib, []).append(i)
    # bytes in units of the device capacity, for the solver's tolerances
    slack = []
    prev, prev_val = None, 0.0
    transients: dict[int, list[int]] = {}
    for i, (k, t) in enumerate(extra):
        if t:
            transients.setdefault(k, []).append(i)
    for k in range(len(peak)):
        f = model.add_variable(lb=0.0, name=f"F{k}")
        terms = ([spans[i][2] / cap * x[i] for i in starts.get(k, [])]
                 + [-spans[i][2] / cap * x[i] for i in ends.get(k, [])])
        model.add_linear_constraint(f == (prev if prev is not None else 0.0)
                                    + mo.fast_sum(terms))  # type: ignore[operator]
        prev_val += (sum(spans[i][2] for i in starts.get(k, []) if i in start)
                     - sum(spans[i][2] for i in ends.get(k, []) if i in start)) / cap
        hint[f] = prev_val
        prev = f
        if peak[k] > cap or transients.get(k):
            held = [extra[i][1] / cap * x[i] for i in transients.get(k, [])]
            held_val = sum(extra[i][1] for i in transients.get(k, []) if i in start) / cap
            s = model.add_variable(lb=0.0, name=f"S{k}")
            slack.append(s)
            hint[s] = max(float(peak[k]) / cap - prev_val + held_val - 1.0, 0.0)
            model.add_linear_constraint(float(peak[k]) / cap - f + mo.fast_sum(held)
                                        <= 1.0 + s)
    for i, j in pairs:
        model.add_linear_constraint(x[i] + x[j] <= 1)
    e = model.add_variable(lb=0.0, name="E")
    hint[e] = max(sum(link_s[i] for i in start) - 1.0, 0.0)
    if num_r < len(spans):
        model.add_linear_constraint(e >= mo.fast_sum(link_s[i] * x[i]
                                                     for i in range(num_r, len(spans))) - 1.0)
    model.minimize(mo.fast_sum([spans[i][3] * x[i] for i in range(len(spans))]
                               + [e] + [OVERFLOW_PENALTY * s for s in slack]))
    params = solve_parameters("highs", seed, 1, WorkBudget(NODE_LIMIT, 0.0, guard_s),
                              RELATIVE_GAP)
    # Without presolve: measured 2026-12-08 on GPT-12 (d 1024, batch 16) on h100-4g (403
    # candidates, 580 offload gaps), HiGHS' presolve took most of the solve: 200 nodes in 4.0 s
    # to optimality instead of 10.7 s to a 0.79% gap.
    params.highs.string_options["presolve"] = "off"
    model_params = mo.ModelSolveParameters(
        solution_hints=[mo.SolutionHint(variable_values=hint)])  # type: ignore[arg-type]
    try:
        with quiet_stdout():
            result = mo.solve(model, mo.SolverType.HIGHS, params=params,
                              model_params=model_params)
    except Exception:  # noqa: BLE001 - HiGHS rejects some starts; solve without it
        with quiet_stdout():
            result = mo.solve(model, mo.SolverType.HIGHS, params=params)
    fired = guard_fired(result)
    reason = result.termination.reason

    def value(sel: set[int]) -> float:
        freed = _freed(sel, spans, cover, extra, len(peak))
        over = np.maximum(peak - freed - cap, 0).sum()
        link = max(sum(link_s[i] for i in sel) - 1.0, 0.0)
        return sum(spans[i][3] for i in sel) + link + OVERFLOW_PENALTY * float(over) / cap

    if not result.has_primal_feasible_solution():
        return start, "heuristic", f"HiGHS ended {reason.name.lower()} without a solution; " \
            "the greedy selection kept", fired
    values = result.variable_values()
    found = {i for i, v in enumerate(x) if values[v] > 0.5}
    status = "optimal" if reason == mo.TerminationReason.OPTIMAL else "feasible"
    gap = _gap(result)
    detail = f"HiGHS {status}" + (f", gap {gap:.2%}" if gap is not None and status != "optimal"
                                  else "")
    # offloads are continuous: compare the solver's objective with the greedy selection's
    if result.objective_value() > value(start) * (1 + 1e-9):
        return start, "heuristic", detail + "; the greedy selection is better and kept", fired
    return found, status, detail, fired


def _gap(result: object) -> float | None:
    bounds = result.termination.objective_bounds  # type: ignore[attr-defined]
    primal, dual = bounds.primal_bound, bounds.dual_bound
    if not np.isfinite(primal) or not np.isfinite(dual):
        return None
    return abs(primal - dual) / max(abs(primal), 1e-12)


def describe(c: Candidate, program: Program) -> str:
    kinds = [_short(program.ops[s].kind) for s in c.chain]
    return (f"{c.tensor} ({c.nbytes / 2**20:.1f} MiB) dropped over steps {c.idle[0]}-{c.idle[1]} "
            f"and recomputed by {len(kinds)} op(s) ({', '.join(dict.fromkeys(kinds))}) from "
            f"{', '.join(c.inputs) or 'nothing'}, est. {c.time_s * 1e6:.1f} us")
