"""The program's lower bound (a per-step knapsack) and the best run to spread a transfer over.

- `program_lower_bound_s`: a bound no plan can beat under costmodel/evaluate.py's semantics: each
  kernel's bytes at the fastest bandwidth a tier that can hold them offers, compute at peak.
- `best_spread_span`: where along a window a transfer adds the least time (re-spreading uses it).

The capacity LP (capacity_lp.py) is the tighter bound where a tier binds. IO lower bounds of
single kernels are in costmodel/io_bounds.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tiermap.costmodel.roofline import compute_lower_bound_s, program_kernels
from tiermap.errors import TiermapError

if TYPE_CHECKING:
    from tiermap.hardware.target import Target, Tier
    from tiermap.ir.fusion import Fusion
    from tiermap.ir.program import Program

# Relative slack subtracted from the program bound so that float summation order in `evaluate`
# can never put a plan's predicted time a few ulps below it.
BOUND_ROUNDING_SLACK = 1e-9


# --- transfers spread over steps ---------------------------------------------------------------


# best_spread_span tries run lengths 1, 2, ... growing by this ratio, and the whole window.
SPREAD_CLASS_RATIO = 1.25


def best_spread_span(transfer_s: float, op_s: np.ndarray) -> tuple[int, int, float]:
    """The run of steps (first, last offsets into `op_s`) to spread a transfer over so that it
    adds the least time to steps taking `op_s`, and that time. Ties go to the longer run (it
    leaves more room to other transfers), then the earlier one. Lengths tried: 1, 2, ...
    growing by SPREAD_CLASS_RATIO, and the whole window.

    Lengths are tried longest first and the search stops at the first run that hides the
    transfer completely (no shorter run can beat it, and ties go to the longer), which on long
    windows is usually the first length tried.
    """
    m = len(op_s)
    if m == 0:
        raise TiermapError("a transfer needs at least one step")
    lengths_set = {m}
    length = 1
    while length < m:
        lengths_set.add(length)
        length = max(length + 1, int(length * SPREAD_CLASS_RATIO))
    best = (0, m - 1, math.inf)
    for length in sorted(lengths_set, reverse=True):  # longest first: ties go to it
        extra = np.maximum(transfer_s / length - op_s, 0.0)
        cum = np.concatenate([[0.0], np.cumsum(extra)])
        sums = cum[length:] - cum[:-length]  # by start, starts 0 .. m - length
        start = int(np.argmin(sums))  # the earliest of equal sums
        added_s = float(sums[start])
        if added_s < best[2]:
            best = (start, start + length - 1, added_s)
        if added_s <= 0.0:
            break
    return best


# --- the program bound --------------------------------------------------------------------------


def _best_bw(nbytes: int, tiers: Sequence[Tier], read: bool) -> float:
    """Fastest bandwidth of a residency tier that can hold `nbytes` (any, if none can)."""
    fits = [t for t in tiers if t.capacity_bytes >= nbytes] or list(tiers)
    return max(t.read_bytes_per_s if read else t.write_bytes_per_s for t in fits)


def _knapsack_time_s(items: Sequence[tuple[float, float]], tiers: Sequence[Tier]) -> float:
    """Least Σ bytes/bandwidth when tensors that coexist must share the tiers' capacities.

    `items` are (nbytes resident, bytes moved). Relaxed to fractional placement with each tier at
    max(read, write) bandwidth: the optimum then puts the most bytes-moved-per-byte-held items on
    the fastest tiers first (rearrangement inequality), so this greedy is exact for the relaxation.
    """
    order = sorted((t for t in tiers), key=lambda t: -max(t.read_bytes_per_s,
                                                          t.write_bytes_per_s))
    caps = [float(t.capacity_bytes) for t in order]
    bws = [max(t.read_bytes_per_s, t.write_bytes_per_s) for t in order]
    total_s = 0.0
    ti = 0
    for held, moved in sorted(items, key=lambda it: -(it[1] / it[0])):
        density = moved / held
        left = float(held)
        while left > 0.0 and ti < len(caps):
            take = min(left, caps[ti])
            total_s += take * density / bws[ti]
            caps[ti] -= take
            left -= take
            if caps[ti] <= 0.0:
                ti += 1
        if left > 0.0:  # more than every tier holds: no plan exists; charge the slowest tier
            total_s += left * density / bws[-1]
    return total_s


def program_lower_bound_s(program: Program, target: Target, fusion: Fusion | None = None) -> float:
    """A time no plan of `program` on `target` (with this fusion) can beat under the cost model.

    Σ over kernels (fusion groups and lone ops) of max(compute_s, memory_s) + op_overhead_s, with
    memory_s the larger of two bounds on the kernel's Σ bytes / bandwidth:
    (a) each tensor moved at the fastest bandwidth of a residency tier whose capacity can hold it;
    (b) per step, the tensors read or written there coexist, so together they fit the tiers'
        capacities: a fractional knapsack over the tiers (`_knapsack_time_s`).
    Why no plan beats it: a step lasts at least its op's time and a group's shares sum to the
    group's time; a read comes from, and a write goes to, a residency tier the tensor is in at that
    step, which holds it (capacity), alongside the kernel's other tensors of that step. Transfers
    only add time. Valid for every plan that keeps tensors in residency tiers within capacity.
    """
    tiers = target.residency_tiers or target.tiers[-1:]
    values = program.values
    compute = [compute_lower_bound_s(op, target) for op in program.ops]
    overhead_s = target.op_overhead_s
    total_s = 0.0
    for k in program_kernels(program, fusion):
        compute_s = sum(compute[s] for s in k.steps)
        simple_s = 0.0
        by_step: dict[int, dict[str, list[float]]] = {}
        for entries, read in ((k.reads, True), (k.writes, False)):
            for vid, step, nbytes in entries:
                if nbytes <= 0:
                    continue
                held = values[vid].nbytes if vid in values else 0
                simple_s += nbytes / _best_bw(held, tiers, read)
                slot = by_step.setdefault(step, {}).setdefault(vid, [float(held), 0.0])
                slot[1] += nbytes
        knap_s = 0.0
        for per_vid in by_step.values():
            items = [(h, m) for h, m in per_vid.values() if h > 0]
            knap_s += _knapsack_time_s(items, tiers)
        total_s += max(compute_s, simple_s, knap_s) + overhead_s
    return total_s * (1.0 - BOUND_ROUNDING_SLACK)
