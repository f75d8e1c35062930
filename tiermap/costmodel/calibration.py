"""Measure this machine's CPU into a schema-v1 target for the working-set cost model.

What is measured, and how: calibration_sweeps.py (every figure the best over interleaved rounds
of `jax.jit` calls, less the per-call time of a trivial program). In short:

1. Cache sizes from the OS (`/sys/devices/system/cpu/cpu0/cache/index*/`), defaults elsewhere.
2. Working-set sweeps (read: a full sum; write: a fill; copy: `x + 1`) over f32 arrays from
   2 KiB to 128 MiB. Each tier's `read_bytes_per_s`, `write_bytes_per_s` and `copy_bytes_per_s`
   is the median over the sweep points whose working set falls in it: above the next faster
   level's whole-chip capacity, up to its own (DRAM: above the last cache). A level is never
   reported slower than the level after it (tiers are listed fastest first; and the tiniest
   kernels, under a microsecond, are timed least precisely).
3. Matmul throughput per dtype by size (`matmul_flops_per_s`; the best is `peak_flops_per_s`).
4. Transcendental throughput (`transcendental_per_s`: exp, tanh, erf, log), the loop rate
   (`vector_peak_fraction` of the f32 peak), the reduction rate (`reduce_flops_per_s`: the best
   of the read sweep), and `parallel_grain_elements` fitted to exp over sizes; rates are stated
   for all units (a rate measured at n elements is divided by `units_used(n) / units`; the
   median over the sizes measured).
5. Per-op overhead: the time per op of a chain of small ops that XLA cannot fuse.
6. Units one convolution keeps busy (`convolution_units`): CPU time over wall time while a
   convolution runs (XLA's CPU backend runs convolutions on one thread).

Caches are `per_unit` tiers (a placement's tile budget), DRAM is the main-memory tier, and the
target sets `working_set_tiers = true`, so the cost model charges each kernel at the tier its
working set fits in (costmodel/working_set.py). Nothing here runs at import time.
"""

from __future__ import annotations

import os
import platform as platform_module
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiermap.costmodel.calibration_sweeps import (
    FIRST_TOUCH_MIN_BYTES,
    Measurements,
    SweepPoint,
    SweepSettings,
    best_call_s,
    fit_parallel_grain,
    floor_s,
    measure_convolution_units,
    measure_elementwise,
    measure_matmuls,
    measure_sweeps,
    settle_allocator,
)
from tiermap.costmodel.roofline import CPU_MEASURED
from tiermap.hardware import Target, Tier, dumps_target, loads_target

ProgressFn = Callable[[str, float], None]

CACHE_SYSFS_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
ECM_SOURCE = (
    "J. Hofmann, G. Hager, D. Fey, On the accuracy and usefulness of analytic energy models "
    "for contemporary multicore processors (ECM model), ISC 2018; "
    "https://arxiv.org/abs/1803.01618"
)
_MEASURED_DTYPES = ("f32", "f64", "bf16", "f16")


@dataclass(frozen=True)
class CacheLevel:
    """One data (or unified) cache level as the OS reports it."""

    level: int
    instance_bytes: int  # capacity of one instance of this cache
    sharing_cpus: int  # logical CPUs that share one instance
    from_os: bool  # False when the figure is a default

    def chip_bytes(self, units: int) -> int:
        """Capacity of all instances of this level on the chip."""
        return self.instance_bytes * max(1, -(-units // self.sharing_cpus))


def calibrate(progress: ProgressFn | None = None, *, quick: bool = False) -> Target:
    """Measure this machine's CPU with JAX and return it as a strict, loadable Target.

    Args:
        progress: Called as `progress(label, fraction)` before each step and with 1.0 at the end;
            `fraction` grows from 0 to 1 (for a progress bar).
        quick: Shrink sizes and repeats (a few seconds; for tests). The full run takes under a
            minute on a small machine.

    Returns:
        The measured target (platform "cpu"): tiers l1, l2, ... (per_unit) then "dram".
    """
    import jax  # imported here, not at module import: nothing heavy runs at import time

    report = _Progress(progress)
    report.step("reading cache sizes", 0.0)
    settings = SweepSettings.make(quick)
    units = os.cpu_count() or 1
    caches = read_cache_levels()
    settle_allocator()
    floor = floor_s(settings.rounds, settings.quiet)  # reported; each step times its own
    report.step("bandwidth of caches and DRAM (working-set sweeps)", 0.35)
    read, write, copy = measure_sweeps(settings)
    report.step("transcendental and loop throughput", 0.15)
    trans, exp_curve, vector_flops_per_s = measure_elementwise(settings)
    matmul: dict[str, tuple[tuple[int, float], ...]] = {}
    for dtype in _MEASURED_DTYPES:
        report.step(f"peak FLOP/s ({dtype})", 0.1)
        matmul.update(measure_matmuls([dtype], settings))
    if "f32" not in matmul:
        raise RuntimeError("calibration could not time an f32 matmul on the CPU backend")
    report.step("per-op overhead", 0.1)
    overhead_s = _measure_op_overhead_s(settings)
    report.step("threads of a convolution", 0.05)
    conv_units = measure_convolution_units(settings, units)
    measurements = Measurements(
        floor_s=floor, op_overhead_s=overhead_s, read=read, write=write, copy=copy,
        transcendental_per_s=trans, exp_by_elements=exp_curve,
        vector_flops_per_s=vector_flops_per_s,
        reduce_flops_per_s=max(p.working_set_bytes / 4 / p.net_s for p in read),
        matmul_flops_per_s=matmul, convolution_units=conv_units)
    target = build_calibrated_target(
        measurements, caches, units, _physical_memory_bytes(), name=_target_name(),
        description=(f"{_cpu_model()} ({units} logical CPUs), measured by tiermap calibrate "
                     f"with JAX {jax.__version__} on the CPU backend"),
        sources=_sources(caches, settings, units))
    # Round trip through the strict loader: what we return is exactly what a file would give.
    loaded = loads_target(target_to_toml(target), source="calibration")
    report.done()
    return loaded


def build_calibrated_target(m: Measurements, caches: Sequence[CacheLevel], units: int,
                            dram_capacity_bytes: int, *, name: str, description: str,
                            sources: Sequence[str]) -> Target:
    """The target that measurements `m` describe (module docstring, steps 2-5); no timing."""
    bounds = [c.chip_bytes(units) for c in caches]
    levels = [f"l{c.level}" for c in caches] + ["dram"]
    reads = _level_medians(m.read, bounds)
    writes = _level_medians([p for p in m.write if p.output_bytes < FIRST_TOUCH_MIN_BYTES],
                            bounds)
    copies = _level_medians([p for p in m.copy if p.output_bytes < FIRST_TOUCH_MIN_BYTES],
                            bounds)
    fresh = [p.bytes_per_s for p in m.write if p.output_bytes >= FIRST_TOUCH_MIN_BYTES]
    first_touch = _round_sig(statistics.median(fresh)) if fresh else None
    for i in range(len(reads) - 2, -1, -1):  # a level is never slower than the next one
        for figures in (reads, writes, copies):
            figures[i] = max(figures[i], figures[i + 1])
    tiers = [
        Tier(name=levels[i],
             capacity_bytes=bounds[i] if i < len(bounds) else dram_capacity_bytes,
             read_bytes_per_s=_round_sig(reads[i]), write_bytes_per_s=_round_sig(writes[i]),
             copy_bytes_per_s=_round_sig(copies[i]), per_unit=i < len(bounds),
             first_touch_bytes_per_s=first_touch if i == len(bounds) else None,
             first_touch_min_bytes=(FIRST_TOUCH_MIN_BYTES
                                    if i == len(bounds) and first_touch else None))
        for i in range(len(levels))]
    peak_f32 = max(r for _, r in m.matmul_flops_per_s["f32"])
    peaks = {d: _round_sig(max(r for _, r in pts)) for d, pts in m.matmul_flops_per_s.items()}
    exp_n = m.exp_by_elements
    grain = fit_parallel_grain(exp_n, units)
    trans = {k: _round_sig(_all_units_rate(v, grain, units))
             for k, v in m.transcendental_per_s.items() if v}
    vector_fraction = min(1.0, _all_units_rate(m.vector_flops_per_s, grain, units) / peak_f32)
    best_read = max(m.read, key=lambda p: p.working_set_bytes / 4 / p.net_s)
    reduce_n = best_read.working_set_bytes // 4
    reduce_rate = m.reduce_flops_per_s * units / _units_used(reduce_n, grain, units)
    return Target(
        name=name, description=description, platform="cpu", peak_flops_per_s=peaks,
        units=units, tiers=tuple(tiers), sources=tuple(sources),
        op_overhead_s=_round_sig(m.op_overhead_s, 3),
        vector_peak_fraction=_round_sig(vector_fraction),
        transcendental_flops=CPU_MEASURED.transcendental_flops,
        parallel_grain_elements=_round_sig(grain) if grain else 0.0,
        working_set_tiers=True,
        matmul_flops_per_s={d: tuple((n, _round_sig(r)) for n, r in pts)
                            for d, pts in m.matmul_flops_per_s.items()},
        transcendental_per_s=trans,
        reduce_flops_per_s=_round_sig(reduce_rate),
        convolution_units=m.convolution_units,
    )


def _units_used(elements: float, grain: float, units: int) -> float:
    if grain <= 0 or units <= 1:
        return float(units)
    return min(float(units), max(1.0, elements / grain))


def _all_units_rate(points: Sequence[tuple[int, float]], grain: float, units: int) -> float:
    """Median over (elements, rate) points of the rate on all units: rate x units / units_used."""
    return statistics.median(rate * units / _units_used(n, grain, units) for n, rate in points)


def _level_medians(points: Sequence[SweepPoint], bounds: Sequence[int]) -> list[float]:
    """Median bandwidth of the points in each level: (bounds[i-1], bounds[i]], then DRAM above
    the last bound. A level without points takes the next slower level's figure; the slowest
    level without points takes the nearest faster level's."""
    out: list[float | None] = []
    lows = [0, *bounds]
    highs = [*bounds, None]
    for low, high in zip(lows, highs, strict=True):
        inside = [p.bytes_per_s for p in points
                  if p.working_set_bytes > low and (high is None or p.working_set_bytes <= high)]
        out.append(statistics.median(inside) if inside else None)
    known = [v for v in out if v is not None]
    last = known[-1] if known else 1e9
    filled: list[float] = [0.0] * len(out)
    for i in range(len(out) - 1, -1, -1):
        value = out[i]
        filled[i] = value if value is not None else (filled[i + 1] if i + 1 < len(out)
                                                      else last)
    return filled


def _round_sig(value: float, digits: int = 4) -> float:
    """`value` rounded to `digits` significant digits (measurements are not more precise)."""
    return float(f"{value:.{digits - 1}e}")


def target_to_toml(target: Target) -> str:
    """The target as schema-v1 TOML text; `tiermap.hardware.load_target` reads it back equal."""
    return dumps_target(target)


# -- the OS ----------------------------------------------------------------------------------------


def read_cache_levels(sysfs_dir: Path = CACHE_SYSFS_DIR) -> list[CacheLevel]:
    """Data and unified cache levels of CPU 0, smallest level first; defaults if unreadable.

    Args:
        sysfs_dir: The `cache` folder of one CPU in sysfs (Linux).
    """
    found: dict[int, CacheLevel] = {}
    for index in sorted(sysfs_dir.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text().strip())
            size_bytes = parse_size_bytes((index / "size").read_text().strip())
            shared = (index / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind not in ("Data", "Unified") or size_bytes <= 0:
            continue
        found[level] = CacheLevel(level, size_bytes, max(1, count_cpus(shared)), from_os=True)
    if found:
        return [found[level] for level in sorted(found)]
    units = os.cpu_count() or 1
    return [
        CacheLevel(1, 32 * 2**10, 1, from_os=False),
        CacheLevel(2, 512 * 2**10, 1, from_os=False),
        CacheLevel(3, 8 * 2**20, units, from_os=False),
    ]


def parse_size_bytes(text: str) -> int:
    """Parse a sysfs cache size such as "48K", "1024K", "32M" or "512" into bytes."""
    found = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, flags=re.IGNORECASE)
    if found is None:
        raise ValueError(f"not a cache size: {text!r}")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[found[2].upper()]
    return int(found[1]) * scale


def count_cpus(cpu_list: str) -> int:
    """Count the CPUs in a sysfs CPU list such as "0-3,8,10-11"."""
    count = 0
    for part in cpu_list.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        count += int(high) - int(low) + 1 if high else 1
    return count


def _physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform_module.processor() or platform_module.machine() or "unknown CPU"


def _target_name() -> str:
    host = re.sub(r"[^a-z0-9-]+", "-", platform_module.node().split(".")[0].lower()).strip("-")
    return f"cpu-{host}" if host else "cpu-calibrated"


def _sources(caches: list[CacheLevel], settings: SweepSettings, units: int) -> tuple[str, ...]:
    """Where every constant of the calibrated target comes from, by key."""
    from_os = all(c.from_os for c in caches)
    best = f"best of {settings.rounds} interleaved rounds of jax.jit calls, less the per-call " \
        "time of a trivial one-element program"
    return (
        f"method: {best} (tiermap/costmodel/calibration_sweeps.py); the cost model is the "
        f"working-set model of tiermap/costmodel/working_set.py, after {ECM_SOURCE}",
        "capacity_bytes: "
        + (f"cache sizes from {CACHE_SYSFS_DIR}/index*/size, times the instances on the chip "
           "(logical CPUs / shared_cpu_list)" if from_os
           else "cache sizes are defaults (the OS did not report them)")
        + "; dram from sysconf(SC_PHYS_PAGES) x SC_PAGE_SIZE",
        "read_bytes_per_s: median over the sweep points in the level of sum(x) over f32[n] "
        "(4n bytes / net time); never below the next level's (also for write and copy)",
        "write_bytes_per_s: the same for a fill, full((n,), s) (4n bytes written)",
        "copy_bytes_per_s: the same for x + 1 (4n read + 4n written; working set 8n); write and "
        "copy points whose output is 32 MiB or more are left out (they land in fresh pages); a "
        "level without points takes the next slower level's figure (the last: the faster's)",
        "first_touch_bytes_per_s: median of the fill points whose output is at least "
        "first_touch_min_bytes = 32 MiB, glibc's largest dynamic mmap threshold on 64-bit "
        "(blocks that large are mapped anew on every allocation, each page faults once)",
        "peak_flops_per_s, matmul_flops_per_s: jitted n x n x n matmuls per dtype, n doubling "
        f"from 32 to at most {settings.matmul_max_n}, 2 n^3 FLOP each; the peak is the best",
        "transcendental_per_s: elements / net time of exp, tanh, erf, log over f32[n], n = 2^16, "
        "2^18, 2^20 (2^14, 2^16 quick), stated for all units, median over n",
        "vector_peak_fraction: a fused chain of 8 multiply-adds over the same arrays "
        "(16 FLOP per element), stated for all units, median over n, over the f32 peak",
        "reduce_flops_per_s: the best elements / net time of the read sweep's sums",
        f"parallel_grain_elements: least-squares fit of exp over 2^11..2^20 elements to "
        f"rate = all-units rate x min({units}, max(1, n / grain)) / {units}",
        "op_overhead_s: slope of the run time of a chain of small ops separated by "
        "optimization barriers (so XLA cannot fuse them)",
        "convolution_units: this process's CPU time over wall time while a jitted 3x3 "
        "convolution of f32[2,40,40,48] (48 output channels) runs back to back, rounded "
        "(calibration_sweeps.measure_convolution_units)",
        "transcendental_flops: the pre-calibration CPU figure (unused when "
        "transcendental_per_s is set)",
    )


# -- measurements ----------------------------------------------------------------------------------


class _Progress:
    """Turns step weights into the growing fraction that `progress(label, fraction)` expects."""

    def __init__(self, callback: ProgressFn | None) -> None:
        self.callback = callback
        self.done_weight = 0.0
        self.pending_weight = 0.0
        # The weights of every step `calibrate` takes, in rough proportion to their time.
        self.total_weight = 0.35 + 0.15 + 0.1 * len(_MEASURED_DTYPES) + 0.1 + 0.05

    def step(self, label: str, weight: float) -> None:
        self.done_weight += self.pending_weight
        self.pending_weight = weight
        if self.callback is not None:
            self.callback(label, min(0.99, self.done_weight / self.total_weight))

    def done(self) -> None:
        if self.callback is not None:
            self.callback("done", 1.0)


def _measure_op_overhead_s(settings: SweepSettings) -> float:
    """Seconds per op of a chain of small, unfusable ops (slope between 1 and k ops)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def chain(ops: int) -> Callable[..., Any]:
        def run(x: Any) -> Any:
            for _ in range(ops):
                x = lax.optimization_barrier(jnp.sin(x) + 1.0)
            return x

        return jax.jit(run)

    x = jnp.full((8, 8), 0.1, jnp.float32)
    long_ops = 32 if settings.rounds < 3 else 128
    short, long = chain(1), chain(long_ops + 1)
    short_s, long_s = best_call_s([(short, [x]), (long, [x])], 3 * settings.rounds, 0.01,
                                  settings.quiet)
    return max(0.0, (long_s - short_s) / long_ops)
