"""Evaluate a placement (residency + transfers + fusion) under the cost model; build Plans.

Semantics are those of tiermap/ir/plan.py's module docstring:

- Each kernel (a fusion group or a lone op) costs its roofline time (roofline.py). An
  input is read from the fastest tier where the tensor is usable at the reading op's step (resident
  there, and not the destination of a transfer still running at that step); an output is written
  to the fastest tier it resides in at its producer step (one that is not a transfer destination,
  if there is one). A fused group's time is split over its ops in proportion to their flops
  (evenly if they have none), so the group's steps add up to its time.
- A transfer (a whole move, or one chunk of one) takes bytes / link bandwidth, spread evenly over
  its steps; a chunked move's copy is usable after its last chunk. Step time is the max of
  the op's time and, for each link, the sum of the shares of the transfers on it at that step.
  `predicted_time_s` = Σ step times.
- A tensor that a plan leaves nowhere usable at a step where it is needed is charged to the slowest
  residency tier that could hold it and reported in `Evaluation.unplaced` (the verifier rejects such
  plans; the evaluation stays defined so that search heuristics can score partial plans).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from tiermap.costmodel.roofline import compute_time_s, program_kernels, transfer_time_s
from tiermap.errors import TiermapError
from tiermap.ir.plan import Plan, Residency, Transfer

if TYPE_CHECKING:
    from tiermap.hardware.target import Target
    from tiermap.ir.fusion import Fusion
    from tiermap.ir.program import Program

_MAX_UNPLACED_REPORTED = 20


@dataclass(frozen=True)
class Evaluation:
    """The cost model's verdict on one placement.

    Attributes:
        op_time_s: per step, the op's roofline time (its share of its fused group's time).
        op_compute_s: per step, the op's compute time alone.
        op_bytes_by_tier: per step, bytes the op reads or writes, by tier (a fused group's
            external reads are charged to its first op that reads them).
        step_time_s: per step, max(op time, per-link transfer time shares).
        predicted_time_s: Σ step_time_s.
        traffic_bytes: by tier, op traffic plus transfer bytes (counted on src and dst).
        occupancy_bytes: by tier, resident bytes at each step.
        energy_j: Σ_tier traffic × energy_pj_per_byte, or None if some tier lacks the figure.
        unplaced: "tensor@step" for reads/writes the plan left with no usable tier (first 20).
        num_unplaced: how many such reads/writes there were.
    """

    op_time_s: tuple[float, ...]
    op_compute_s: tuple[float, ...]
    op_bytes_by_tier: tuple[Mapping[str, float], ...]
    step_time_s: tuple[float, ...]
    predicted_time_s: float
    traffic_bytes: Mapping[str, float] = field(hash=False)
    occupancy_bytes: Mapping[str, tuple[int, ...]] = field(hash=False)
    energy_j: float | None = None
    unplaced: tuple[str, ...] = ()
    num_unplaced: int = 0

    @property
    def transfer_bound_steps(self) -> tuple[int, ...]:
        """Steps whose time is set by a transfer rather than by the op."""
        return tuple(s for s, (op_s, step_s) in enumerate(zip(self.op_time_s, self.step_time_s,
                                                             strict=True)) if step_s > op_s)


_COMPUTE_CACHE: dict[tuple[int, int], tuple[weakref.ref[Program], weakref.ref[Target],
                                              tuple[float, ...]]] = {}


def _compute_times(program: Program, target: Target) -> tuple[float, ...]:
    key = (id(program), id(target))
    hit = _COMPUTE_CACHE.get(key)
    if hit is not None and hit[0]() is program and hit[1]() is target:
        return hit[2]
    out = tuple(compute_time_s(op, target) for op in program.ops)
    if len(_COMPUTE_CACHE) >= 16:
        _COMPUTE_CACHE.pop(next(iter(_COMPUTE_CACHE)))
    _COMPUTE_CACHE[key] = (weakref.ref(program), weakref.ref(target), out)
    return out


def evaluate(program: Program, target: Target, residency: Mapping[str, Sequence[Residency]],
             transfers: Sequence[Transfer], fusion: Fusion | None = None) -> Evaluation:
    """Score a placement: per-step times, traffic, occupancy and energy (module docstring).

    Args:
        program: the program in schedule order.
        target: the hardware target.
        residency: tensor id → its residency intervals (tiers by name).
        transfers: the copies between tiers.
        fusion: fusion decisions; None means every op alone.

    Raises:
        TiermapError: a residency or transfer names a tier or tensor the target/program lacks.
    """
    n = program.num_steps
    tiers = target.tiers
    tier_names = [t.name for t in tiers]
    tier_index = {name: i for i, name in enumerate(tier_names)}
    read_bw = [t.read_bytes_per_s for t in tiers]
    write_bw = [t.write_bytes_per_s for t in tiers]
    values = program.values

    def index_of(tier: str, what: str) -> int:
        ti = tier_index.get(tier)
        if ti is None:
            raise TiermapError(f"{what} names tier '{tier}', which target '{target.name}' lacks "
                               f"(tiers: {', '.join(tier_names)})")
        return ti

    # (1) Index residency intervals and in-flight transfer destinations per tensor.
    res_of: dict[str, list[tuple[int, int, int]]] = {}
    occ_diff = [[0] * (n + 1) for _ in tiers]
    for vid, intervals in residency.items():
        value = values.get(vid)
        if value is None:
            raise TiermapError(f"residency names tensor '{vid}', which program "
                               f"'{program.name}' lacks")
        nbytes = value.nbytes
        lst = res_of.setdefault(vid, [])
        for r in intervals:
            ti = index_of(r.tier, f"residency of {vid}")
            lst.append((r.from_step, r.to_step, ti))
            lo, hi = max(r.from_step, 0), min(r.to_step, n - 1)
            if lo <= hi:
                occ_diff[ti][lo] += nbytes
                occ_diff[ti][hi + 1] -= nbytes
    # A transfer's destination copy is the dst-tier interval that holds its start step (the latest
    # such); it becomes usable at end_step + 1.
    usable_from: dict[tuple[str, int], int] = {}
    for x in transfers:
        di = index_of(x.dst, f"transfer of {x.tensor}")
        best_k = -1
        for k, (lo, hi, ti) in enumerate(res_of.get(x.tensor, ())):
            if ti == di and lo <= x.start_step <= hi and (
                    best_k < 0 or lo > res_of[x.tensor][best_k][0]):
                best_k = k
        if best_k >= 0:
            copy_key = (x.tensor, best_k)
            usable_from[copy_key] = max(usable_from.get(copy_key, 0), x.end_step + 1)

    residency_idx = [i for i, t in enumerate(tiers) if t.holds_tensors] or [len(tiers) - 1]
    unplaced: list[str] = []
    num_unplaced = 0

    def fallback(vid: str, bw: list[float]) -> int:
        nbytes = values[vid].nbytes if vid in values else 0
        fits = [i for i in residency_idx if tiers[i].capacity_bytes >= nbytes] or residency_idx
        return min(fits, key=lambda i: (bw[i], -i))

    def tier_for(vid: str, step: int, bw: list[float], reading: bool) -> int:
        nonlocal num_unplaced
        best = -1
        best_bw = -1.0
        best_is_dst = True
        for k, (lo, hi, ti) in enumerate(res_of.get(vid, ())):
            if not lo <= step <= hi:
                continue
            is_dst = step < usable_from.get((vid, k), lo)
            if is_dst and reading:
                continue
            # Writes prefer a copy that is not a transfer's destination; then the fastest.
            if (best_is_dst and not is_dst) or (is_dst == best_is_dst and bw[ti] > best_bw):
                best, best_bw, best_is_dst = ti, bw[ti], is_dst
        if best < 0:
            num_unplaced += 1
            if len(unplaced) < _MAX_UNPLACED_REPORTED:
                unplaced.append(f"{vid}@{step}")
            return fallback(vid, bw)
        return best

    # (2) Kernels: roofline time, split over the group's ops by flops.
    compute_s = _compute_times(program, target)
    op_time = [0.0] * n
    op_bytes: list[dict[str, float]] = [{} for _ in range(n)]
    traffic = [0.0] * len(tiers)
    overhead_s = target.op_overhead_s
    for kernel in program_kernels(program, fusion):
        read_by_tier: dict[int, float] = {}
        write_by_tier: dict[int, float] = {}
        for vid, step, access_bytes in kernel.reads:
            if access_bytes:
                ti = tier_for(vid, step, read_bw, True)
                read_by_tier[ti] = read_by_tier.get(ti, 0.0) + access_bytes
                ob = op_bytes[step]
                ob[tier_names[ti]] = ob.get(tier_names[ti], 0.0) + access_bytes
        for vid, step, access_bytes in kernel.writes:
            if access_bytes:
                ti = tier_for(vid, step, write_bw, False)
                write_by_tier[ti] = write_by_tier.get(ti, 0.0) + access_bytes
                ob = op_bytes[step]
                ob[tier_names[ti]] = ob.get(tier_names[ti], 0.0) + access_bytes
        mem_s = 0.0
        for ti, tier_bytes in read_by_tier.items():
            mem_s += tier_bytes / read_bw[ti]
            traffic[ti] += tier_bytes
        for ti, tier_bytes in write_by_tier.items():
            mem_s += tier_bytes / write_bw[ti]
            traffic[ti] += tier_bytes
        steps = kernel.steps
        comp = 0.0
        for s in steps:
            comp += compute_s[s]
        kernel_s = max(comp, mem_s) + overhead_s
        if len(steps) == 1:
            op_time[steps[0]] = kernel_s
            continue
        weights = [program.ops[s].flops for s in steps]
        total_w = sum(weights)
        if total_w <= 0.0:
            weights = [1.0] * len(steps)
            total_w = float(len(steps))
        given = 0.0
        for s, w in zip(steps[:-1], weights[:-1], strict=True):
            share = kernel_s * (w / total_w)
            op_time[s] = share
            given += share
        op_time[steps[-1]] = max(kernel_s - given, 0.0)

    # (3) Transfers: per-link time spread over their steps (`step_times_s`).
    for x in transfers:
        si = index_of(x.src, f"transfer of {x.tensor}")
        di = index_of(x.dst, f"transfer of {x.tensor}")
        traffic[si] += x.bytes
        traffic[di] += x.bytes
    step_time = step_times_s(op_time, transfers, target)

    # (4) Occupancy, traffic, energy.
    occupancy: dict[str, tuple[int, ...]] = {}
    for ti, diff_i in enumerate(occ_diff):
        acc_i = 0
        row = []
        for s in range(n):
            acc_i += diff_i[s]
            row.append(acc_i)
        occupancy[tier_names[ti]] = tuple(row)
    traffic_by_name = {tier_names[i]: traffic[i] for i in range(len(tiers))}
    energy_j: float | None = None
    if all(t.energy_pj_per_byte is not None for t in tiers):
        energy_j = sum(traffic[i] * float(t.energy_pj_per_byte or 0.0)
                       for i, t in enumerate(tiers)) * 1e-12
    return Evaluation(
        op_time_s=tuple(op_time),
        op_compute_s=compute_s,
        op_bytes_by_tier=tuple(MappingProxyType(d) for d in op_bytes),
        step_time_s=tuple(step_time),
        predicted_time_s=float(sum(step_time)),
        traffic_bytes=MappingProxyType(traffic_by_name),
        occupancy_bytes=MappingProxyType(occupancy),
        energy_j=energy_j,
        unplaced=tuple(unplaced),
        num_unplaced=num_unplaced,
    )


def step_times_s(op_time_s: Sequence[float], transfers: Iterable[Transfer], target: Target
                 ) -> list[float]:
    """Predicted time of every step: max(op time, for each link the sum of the shares of the
    transfers on it at that step); a transfer's time (bytes / link bandwidth) is spread evenly
    over its steps (tiermap/ir/plan.py's semantics).

    The one step-time routine: `evaluate` (the scorer), the report, the plots and the trace use
    it. The placement's incremental `CostState` computes the same quantity on arrays for speed
    (tests hold it to this), and the verifier keeps its own on purpose, to check independently.
    """
    n = len(op_time_s)
    link_diff: dict[tuple[str, str], list[float]] = {}
    for x in transfers:
        if n == 0:
            break
        t_s = transfer_time_s(x.bytes, x.src, x.dst, target)
        lo = min(max(x.start_step, 0), n - 1)
        hi = min(max(x.end_step, lo), n - 1)
        share = t_s / (hi - lo + 1)
        link_key = (x.src, x.dst) if x.src <= x.dst else (x.dst, x.src)
        diff = link_diff.get(link_key)
        if diff is None:
            diff = link_diff[link_key] = [0.0] * (n + 1)
        diff[lo] += share
        diff[hi + 1] -= share
    step_time = list(op_time_s)
    for diff in link_diff.values():
        acc = 0.0
        for s in range(n):
            acc += diff[s]
            if acc > step_time[s]:
                step_time[s] = acc
    return step_time


def plan_step_times_s(plan: Plan) -> list[float]:
    """`step_times_s` of a finished plan, from its ops' predicted times and its transfers."""
    op_time_s = [0.0] * plan.num_steps
    for op in plan.ops:
        if 0 <= op.step < plan.num_steps:
            op_time_s[op.step] += op.predicted_time_s
    return step_times_s(op_time_s, plan.transfers, plan.target)
