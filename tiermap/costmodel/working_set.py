"""The working-set (ECM-style) cost model of a calibrated CPU target.

It applies to a target that sets `[compute] working_set_tiers = true` (what `tiermap calibrate`
writes); `roofline.op_cost`, `roofline.group_cost` and `roofline.compute_time_s` defer to it then,
and every other target keeps the plain roofline. The formulas (docs/architecture.md, "Cost
model"), each constant a calibrated one (calibration_sweeps.py says how it is measured):

- A kernel (an op, or a fused group) with working set W = Σ bytes it reads + Σ bytes it writes
  runs its memory traffic at the *working-set tier*: the fastest tier (caches included) whose
  whole-chip `capacity_bytes` holds W, the last tier if none does: a tensor placed in main
  memory streams from the cache level that holds the kernel's working set (the
  Execution-Cache-Memory model of Hager, Treibig and Wellein). Bytes placed in a tier faster
  than that one (a scratchpad) are charged at their own tier. The bandwidths used for the
  working-set tier are interpolated log-log in W between the tiers' centers (the geometric
  middle of each tier's working-set range, which is what its calibrated median stands for;
  `working_set_tier`), so that a working set just past a capacity is charged between the two
  levels rather than a whole level slower.
- Memory time at a tier t, with r bytes read and w written there: with a measured
  `copy_bytes_per_s`, the bytes that pair a read with a write, p = min(r, w), move at the copy
  rate and the rest at the read or the write rate:
  `2p / copy_bytes_per_s + (r - p) / read_bytes_per_s + (w - p) / write_bytes_per_s`;
  without it, `r / read_bytes_per_s + w / write_bytes_per_s`.
- An output of at least the main tier's `first_touch_min_bytes` is written into fresh pages
  (glibc maps blocks that large anew for every allocation, and each page faults on first
  touch): its bytes take `first_touch_bytes_per_s` instead, added to the time above.
- Compute time:
  - a contraction (dot, convolution) of F flops with E output elements over a batch of B
    (XLA's CPU backend runs a batched dot as B matmuls of F / B flops each):
    `F / (matmul_rate(dtype, n) x units_used(E / B) / units_used(n^2))`, where
    `n = (F / 2B)^(1/3)` is the side of the square matmul with the flops of one of them, the
    rate is interpolated log-linearly in n between the calibrated sizes (clamped at both ends;
    the dtype's peak without a table),
    and the units factor says that XLA splits a contraction over its output: one with fewer
    output elements than the square of the same flops keeps fewer cores busy;
    a convolution is costed as its implicit GEMM (F = 2 x output elements x window x input
    channels, the frontend's count) at that rate, times `convolution_units / units` when the
    calibration measured how many units a convolution keeps busy (XLA's CPU backend runs its
    convolutions on one thread while its matmuls use every core);
  - any other op: its flops at the loop rate (`vector_peak_fraction` x the f32 peak; a reduce's
    body flops at `reduce_flops_per_s` when measured), plus each transcendental at its measured
    rate (`transcendental_per_s[kind]`; kinds not measured at the exponential's rate), all
    times `units_used / units` (`parallel_grain_elements`, roofline.units_used).
- Kernel time: `max(compute, memory) + op_overhead_s`, as in the plain roofline.
No factor depends on which op or program is costed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tiermap.hardware.target import Target, Tier
    from tiermap.ir.program import Op

CONTRACTION_KINDS = frozenset({"stablehlo.dot_general", "stablehlo.dot",
                               "stablehlo.convolution"})
CONVOLUTION_KINDS = frozenset({"stablehlo.convolution"})
REDUCE_KINDS = frozenset({"stablehlo.reduce"})
# A transcendental of a kind the calibration did not time costs what an exponential does.
FALLBACK_TRANSCENDENTAL = "exponential"


def applies(target: Target) -> bool:
    """Whether `target` asks for the working-set model (`[compute] working_set_tiers`)."""
    return target.working_set_tiers


def working_set_tier_index(working_set_bytes: float, target: Target) -> int:
    """Index of the fastest tier whose whole-chip capacity holds the working set (else the last)."""
    for i, tier in enumerate(target.tiers):
        if tier.capacity_bytes >= working_set_bytes:
            return i
    return len(target.tiers) - 1


def tier_centers_bytes(target: Target) -> list[float]:
    """The working set each tier's bandwidth figures stand for: the geometric middle of its range
    (the next faster tier's capacity, its own]; the first tier's range starts at 1/8 of its
    capacity, and the last tier stands for 1.5x the capacity of the one before it (the first
    working set of the calibration sweep past the last cache)."""
    caps = [float(t.capacity_bytes) for t in target.tiers]
    out = []
    for i, cap in enumerate(caps):
        if i == len(caps) - 1 and i > 0:
            out.append(1.5 * caps[i - 1])
        else:
            low = caps[i - 1] if i > 0 else cap / 8.0
            out.append(math.sqrt(low * cap))
    return out


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """Log-log interpolation of ys over ascending xs at x, clamped at both ends."""
    if x <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
        if x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return ys[-1]


def working_set_tier(working_set_bytes: float, target: Target) -> Tier:
    """The memory a kernel with this working set streams from, as a tier: bandwidths
    interpolated log-log in the working set between the tiers' centers (`tier_centers_bytes`),
    so that a working set just past a cache's capacity is not charged a whole level slower."""
    tiers = target.tiers
    at = tiers[working_set_tier_index(working_set_bytes, target)]
    centers = tier_centers_bytes(target)
    if len(tiers) < 2 or any(b <= a for a, b in zip(centers, centers[1:], strict=False)):
        return at
    ws = max(working_set_bytes, 1.0)
    read = _interpolate(ws, centers, [t.read_bytes_per_s for t in tiers])
    write = _interpolate(ws, centers, [t.write_bytes_per_s for t in tiers])
    copies = [t.copy_bytes_per_s for t in tiers]
    copy = (_interpolate(ws, centers, [float(c) for c in copies if c is not None])
            if all(c is not None for c in copies) else at.copy_bytes_per_s)
    return replace(at, read_bytes_per_s=read, write_bytes_per_s=write, copy_bytes_per_s=copy)


def stream_time_s(read_bytes: float, write_bytes: float, tier: Tier) -> float:
    """Seconds to read and write these bytes at `tier` (module docstring)."""
    paired = min(read_bytes, write_bytes) if tier.copy_bytes_per_s else 0.0
    time_s = 2.0 * paired / tier.copy_bytes_per_s if paired and tier.copy_bytes_per_s else 0.0
    if read_bytes > paired:
        time_s += (read_bytes - paired) / tier.read_bytes_per_s
    if write_bytes > paired:
        time_s += (write_bytes - paired) / tier.write_bytes_per_s
    return time_s


def first_touch_bytes(write_bytes_by_tensor: Iterable[tuple[str, float]], target: Target
                      ) -> float:
    """Bytes of the outputs, given as (tier, bytes) per tensor, that land in fresh pages."""
    total = 0.0
    for name, nbytes in write_bytes_by_tensor:
        tier = target.tier(name)
        if tier.first_touch_min_bytes is not None and nbytes >= tier.first_touch_min_bytes:
            total += nbytes
    return total


def memory_time_s(read_bytes_by_tier: Mapping[str, float],
                  write_bytes_by_tier: Mapping[str, float], target: Target,
                  first_touch_write_bytes: float = 0.0) -> float:
    """Memory seconds of one kernel whose bytes are placed as given (module docstring).

    `first_touch_write_bytes` of the main tier's writes go to fresh pages (`first_touch_bytes`).
    """
    working_set = sum(read_bytes_by_tier.values()) + sum(write_bytes_by_tier.values())
    at = working_set_tier_index(working_set, target)
    charged: dict[int, list[float]] = {}
    main = target.main_tier
    fresh = first_touch_write_bytes if main.first_touch_bytes_per_s else 0.0
    for side, by_tier in ((0, read_bytes_by_tier), (1, write_bytes_by_tier)):
        for name, nbytes in by_tier.items():
            if side == 1 and name == main.name:
                nbytes = max(0.0, nbytes - fresh)
            if nbytes:
                index = min(at, target.tier_index(name))
                charged.setdefault(index, [0.0, 0.0])[side] += nbytes
    streaming = working_set_tier(working_set, target)
    time_s = sum(stream_time_s(r, w, streaming if i == at else target.tiers[i])
                 for i, (r, w) in charged.items())
    if fresh and main.first_touch_bytes_per_s:
        time_s += fresh / main.first_touch_bytes_per_s
    return time_s


def matmul_rate_flops_per_s(dtype: str, flops: float, target: Target) -> float:
    """FLOP/s of a contraction of `flops` in `dtype`: the calibrated square-matmul rate at
    n = (flops / 2)^(1/3), log-linear in n between points, clamped; else the dtype's peak."""
    points = target.matmul_flops_per_s.get(dtype)
    if not points:
        return target.peak(dtype)
    n = max(flops / 2.0, 1.0) ** (1.0 / 3.0)
    if n <= points[0][0]:
        return points[0][1]
    if n >= points[-1][0]:
        return points[-1][1]
    for (n0, r0), (n1, r1) in zip(points, points[1:], strict=False):
        if n0 <= n <= n1:
            t = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
    return points[-1][1]


def transcendental_rate_per_s(kind: str, target: Target) -> float | None:
    """Elements per second of a transcendental op kind on all units, None when not measured."""
    rates = target.transcendental_per_s
    if not rates:
        return None
    short = kind.split(".", 1)[-1]
    if short in rates:
        return rates[short]
    return rates.get(FALLBACK_TRANSCENDENTAL, min(rates.values()))


def units_for(elements: float, target: Target) -> float:
    """Units an op with `elements` of work keeps busy: elements / grain, between 1 and all."""
    grain = target.parallel_grain_elements
    units = max(target.units, 1)
    if grain <= 0.0 or units == 1:
        return float(units)
    return min(float(units), max(1.0, elements / grain))


def compute_time_s(op: Op, target: Target, vector_flops_per_s: float, units_fraction: float,
                   output_elements: float | None = None) -> float:
    """Compute seconds of `op` under the working-set model (module docstring).

    Args:
        op: the op.
        target: a target for which `applies` holds.
        vector_flops_per_s: the loop rate of `op`'s dtype on all units (roofline's rule).
        units_fraction: `units_used / units` (roofline.units_used).
        output_elements: a contraction's output elements (roofline.work_elements).
    """
    if op.kind in CONTRACTION_KINDS:
        if op.flops <= 0.0:
            return 0.0
        batch = max(float(op.attrs.get("batch", 1)), 1.0)
        per_matrix = op.flops / batch
        rate = matmul_rate_flops_per_s(op.dtype, per_matrix, target)
        if output_elements is not None:
            side = max(per_matrix / 2.0, 1.0) ** (1.0 / 3.0)
            rate *= min(1.0, units_for(output_elements / batch, target)
                        / units_for(side**2, target))
        if op.kind in CONVOLUTION_KINDS and target.convolution_units:
            rate *= min(1.0, target.convolution_units / max(target.units, 1))
        return op.flops / rate
    fraction = max(units_fraction, 1e-9)
    flops_rate = vector_flops_per_s
    if op.kind in REDUCE_KINDS and target.reduce_flops_per_s > 0.0:
        flops_rate = target.reduce_flops_per_s
    time_s = op.flops / (flops_rate * fraction) if op.flops > 0.0 else 0.0
    if op.transcendentals > 0.0:
        measured = transcendental_rate_per_s(op.kind, target)
        trans_rate = (measured if measured is not None
                      else vector_flops_per_s / max(target.transcendental_flops, 1e-9))
        time_s += op.transcendentals / (trans_rate * fraction)
    return time_s
