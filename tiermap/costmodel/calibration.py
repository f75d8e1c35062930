"""Measure this machine's CPU into a schema-v1 target: peak FLOP/s, cache and DRAM bandwidth.

What is measured, and how (each figure is the best of several short runs, so noise only lowers it):

1. Cache sizes from the OS (`/sys/devices/system/cpu/cpu0/cache/index*/`), defaults elsewhere.
2. Peak FLOP/s per dtype (f32, f64, bf16, f16): jitted square matmuls on the CPU backend, growing
   the size until one call takes long enough to time; the best rate over sizes and repeats.
3. Bandwidth per cache level and DRAM, STREAM-style (McCalpin 1995): a jitted loop of
   `x = 0.5 * x + b` over arrays sized to fit the level (12 bytes move per f32 element per pass).
   It runs as one stream and as one stream per logical CPU at once; the larger whole-chip figure
   counts. A level is never reported faster than the level above it (tiers must be fastest first).
4. Per-op overhead: the time per op of a chain of small ops that XLA cannot fuse.

Every tier but DRAM is `per_unit` (the cost model's tile budget of one core; a shared L3 is split
evenly), so DRAM is the main-memory tier. Nothing here runs at import time.
"""

from __future__ import annotations

import os
import platform as platform_module
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tiermap.costmodel.roofline import CPU_MEASURED
from tiermap.hardware import Target, Tier, dumps_target, loads_target

ProgressFn = Callable[[str, float], None]

CACHE_SYSFS_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
STREAM_SOURCE = (
    "J. D. McCalpin, Memory Bandwidth and Machine Balance in Current High Performance "
    "Computers, IEEE TCCA Newsletter, 1995; https://www.cs.virginia.edu/stream/"
)
_BYTES_PER_ELEMENT_PASS = 12  # f32 triad x = 0.5 * x + b: read x, read b, write x
_MEASURED_DTYPES = ("f32", "f64", "bf16", "f16")


@dataclass(frozen=True)
class CacheLevel:
    """One data (or unified) cache level as the OS reports it."""

    level: int
    instance_bytes: int  # capacity of one instance of this cache
    sharing_cpus: int  # logical CPUs that share one instance
    from_os: bool  # False when the figure is a default


@dataclass(frozen=True)
class _Settings:
    """How long and how large each measurement is; `quick` shrinks everything for tests."""

    matmul_max_n: int
    matmul_call_s: float
    bandwidth_call_s: float
    repeats: int
    dram_max_bytes: int
    overhead_chain_ops: int

    @staticmethod
    def make(quick: bool) -> _Settings:
        if quick:
            return _Settings(512, 0.004, 0.004, 3, 64 * 2**20, 32)
        return _Settings(2048, 0.05, 0.08, 9, 512 * 2**20, 128)


def calibrate(progress: ProgressFn | None = None, *, quick: bool = False) -> Target:
    """Measure this machine's CPU with JAX and return it as a strict, loadable Target.

    Args:
        progress: Called as `progress(label, fraction)` before each step and with 1.0 at the end;
            `fraction` grows from 0 to 1 (for a progress bar).
        quick: Shrink sizes and repeats (a few seconds; for tests). The full run takes well under
            a minute on a small machine.

    Returns:
        The measured target (platform "cpu"): tiers l1, l2, ... (per_unit) then "dram".
    """
    import jax  # imported here, not at module import: nothing heavy runs at import time

    if progress is not None:
        progress("reading cache sizes", 0.0)
    settings = _Settings.make(quick)
    units = os.cpu_count() or 1
    device = jax.devices("cpu")[0]
    caches = read_cache_levels()
    report = _Progress(progress, levels=len(caches))

    peaks: dict[str, float] = {}
    for dtype in _MEASURED_DTYPES:
        report.step(f"peak FLOP/s ({dtype})", 0.12)
        rate = _measure_matmul_flops_per_s(dtype, device, settings)
        if rate is not None:
            peaks[dtype] = _round_sig(rate)
    if "f32" not in peaks:
        raise RuntimeError("calibration could not time an f32 matmul on the CPU backend")

    tiers: list[Tier] = []
    ceiling_bytes_per_s = float("inf")
    dram_capacity_bytes = _physical_memory_bytes()
    with ThreadPoolExecutor(max_workers=units) as pool:
        for cache in caches:
            report.step(f"bandwidth of L{cache.level}", 0.06)
            instances = max(1, -(-units // cache.sharing_cpus))
            single_bytes = cache.instance_bytes // 2
            each_bytes = max(4096, cache.instance_bytes // (2 * cache.sharing_cpus))
            rate = _measure_stream_bytes_per_s(
                single_bytes, each_bytes, units, device, pool, settings
            )
            ceiling_bytes_per_s = min(ceiling_bytes_per_s, _round_sig(rate))
            tiers.append(
                Tier(
                    name=f"l{cache.level}",
                    capacity_bytes=cache.instance_bytes * instances,
                    read_bytes_per_s=ceiling_bytes_per_s,
                    write_bytes_per_s=ceiling_bytes_per_s,
                    per_unit=True,
                )
            )
        report.step("bandwidth of DRAM", 0.1)
        last_level_bytes = sum(t.capacity_bytes for t in tiers[-1:])
        dram_set_bytes = min(
            max(4 * last_level_bytes, 64 * 2**20),
            settings.dram_max_bytes,
            dram_capacity_bytes // 8,
        )
        each_bytes = max(4096, dram_set_bytes // units)
        rate = _measure_stream_bytes_per_s(
            dram_set_bytes, each_bytes, units, device, pool, settings
        )
        ceiling_bytes_per_s = min(ceiling_bytes_per_s, _round_sig(rate))
        tiers.append(
            Tier(
                name="dram",
                capacity_bytes=dram_capacity_bytes,
                read_bytes_per_s=ceiling_bytes_per_s,
                write_bytes_per_s=ceiling_bytes_per_s,
            )
        )

    report.step("per-op overhead", 0.08)
    op_overhead_s = _round_sig(_measure_op_overhead_s(device, settings), 3)

    target = Target(
        name=_target_name(),
        description=(
            f"{_cpu_model()} ({units} logical CPUs), measured by tiermap calibrate with "
            f"JAX {jax.__version__} on the CPU backend"
        ),
        platform="cpu",
        peak_flops_per_s=peaks,
        units=units,
        tiers=tuple(tiers),
        sources=_sources(caches, settings, units),
        op_overhead_s=op_overhead_s,
        vector_peak_fraction=CPU_MEASURED.vector_peak_fraction,
        transcendental_flops=CPU_MEASURED.transcendental_flops,
        parallel_grain_elements=CPU_MEASURED.parallel_grain_elements,
    )
    # Round trip through the strict loader: what we return is exactly what a file would give.
    loaded = loads_target(target_to_toml(target), source="calibration")
    report.done()
    return loaded


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


def _sources(caches: list[CacheLevel], settings: _Settings, units: int) -> tuple[str, ...]:
    from_os = all(c.from_os for c in caches)
    return (
        "peak_flops_per_s: best of "
        f"{settings.repeats} runs of jitted square matmuls (n up to {settings.matmul_max_n}) "
        "per dtype on JAX's CPU backend; 2 n^3 FLOP per matmul",
        "read/write_bytes_per_s: STREAM-style loop x = 0.5 * x + b over f32 arrays sized to "
        f"half of each level, 12 bytes per element per pass, best of {settings.repeats}, the "
        f"larger of 1 stream and {units} concurrent streams; a level is capped at the level "
        f"above it. {STREAM_SOURCE}",
        "capacity_bytes: "
        + (
            f"cache sizes from {CACHE_SYSFS_DIR}/index*/size, times the instances "
            "(logical CPUs / shared_cpu_list)"
            if from_os
            else "cache sizes are defaults (the OS did not report them)"
        )
        + "; dram from sysconf(SC_PHYS_PAGES) x SC_PAGE_SIZE",
        "op_overhead_s: slope of the run time of a chain of small ops separated by "
        "optimization barriers (so XLA cannot fuse them)",
    )


# -- measurements ----------------------------------------------------------------------------------


class _Progress:
    """Turns step weights into the growing fraction that `progress(label, fraction)` expects."""

    def __init__(self, callback: ProgressFn | None, levels: int) -> None:
        self.callback = callback
        self.done_weight = 0.0
        self.pending_weight = 0.0
        # The weights of every step `calibrate` takes, in rough proportion to their time.
        self.total_weight = 0.12 * len(_MEASURED_DTYPES) + 0.06 * levels + 0.1 + 0.08

    def step(self, label: str, weight: float) -> None:
        self.done_weight += self.pending_weight
        self.pending_weight = weight
        if self.callback is not None:
            self.callback(label, min(0.99, self.done_weight / self.total_weight))

    def done(self) -> None:
        if self.callback is not None:
            self.callback("done", 1.0)


def _block(fn: Callable[..., Any], *args: Any) -> Any:
    """Call `fn(*args)` and wait for the result to be computed."""
    return fn(*args).block_until_ready()


def _best_time_s(run: Callable[[], Any], repeats: int) -> float:
    """The shortest of `repeats` timed calls of `run` (after one untimed warm-up call)."""
    run()
    best_s = float("inf")
    for _ in range(repeats):
        start_s = time.perf_counter()
        run()
        best_s = min(best_s, time.perf_counter() - start_s)
    return max(best_s, 1e-9)


def _measure_matmul_flops_per_s(dtype: str, device: Any, settings: _Settings) -> float | None:
    """Best FLOP/s of jitted n x n matmuls in `dtype`; None if the backend cannot run them."""
    import jax
    import jax.numpy as jnp

    np_dtype = {"f32": jnp.float32, "f64": jnp.float64, "bf16": jnp.bfloat16, "f16": jnp.float16}
    best_flops_per_s = 0.0
    with jax.enable_x64(dtype == "f64"):
        matmul = jax.jit(jnp.matmul)
        n = 128
        try:
            while n <= settings.matmul_max_n:
                a = jax.device_put(jnp.full((n, n), 0.5, dtype=np_dtype[dtype]), device)
                b = jax.device_put(jnp.full((n, n), 0.25, dtype=np_dtype[dtype]), device)
                elapsed_s = _best_time_s(partial(_block, matmul, a, b), settings.repeats)
                best_flops_per_s = max(best_flops_per_s, 2.0 * n**3 / elapsed_s)
                if elapsed_s >= settings.matmul_call_s:
                    break
                n *= 2
        except Exception:  # XLA raises various errors for a dtype it cannot run: skip it
            return best_flops_per_s or None
    return best_flops_per_s or None


def _triad_loop() -> Callable[..., Any]:
    import jax
    from jax import lax

    @jax.jit
    def triad(x: Any, b: Any, passes: Any) -> Any:
        return lax.fori_loop(0, passes, lambda _, y: y * 0.5 + b, x)

    return triad


def _measure_stream_bytes_per_s(
    single_set_bytes: int,
    each_set_bytes: int,
    streams: int,
    device: Any,
    pool: ThreadPoolExecutor,
    settings: _Settings,
) -> float:
    """Whole-chip triad bandwidth: the larger of one stream and `streams` concurrent streams.

    Args:
        single_set_bytes: Working set (x and b together) of the single stream.
        each_set_bytes: Working set of each concurrent stream.
        streams: How many concurrent streams (one per logical CPU).
        device: The CPU device to run on.
        pool: Threads for the concurrent streams.
        settings: Call length and repeats.
    """
    import jax
    import jax.numpy as jnp

    triad = _triad_loop()

    def arrays(set_bytes: int) -> tuple[Any, Any, int]:
        elements = max(256, set_bytes // 8)  # two f32 arrays
        x = jax.device_put(jnp.ones((elements,), jnp.float32), device)
        b = jax.device_put(jnp.full((elements,), 0.1, jnp.float32), device)
        return x, b, elements

    def passes_for(x: Any, b: Any, elements: int) -> int:
        # Time a short run, then size the pass count so one call lasts about bandwidth_call_s.
        probe_passes = max(1, int(2e6 // elements))
        probe_s = _best_time_s(lambda: triad(x, b, probe_passes).block_until_ready(), 1)
        return max(1, int(probe_passes * settings.bandwidth_call_s / probe_s))

    def one_stream_bytes_per_s() -> float:
        x, b, elements = arrays(single_set_bytes)
        passes = passes_for(x, b, elements)
        elapsed_s = _best_time_s(lambda: triad(x, b, passes).block_until_ready(), settings.repeats)
        return _BYTES_PER_ELEMENT_PASS * elements * passes / elapsed_s

    best_bytes_per_s = one_stream_bytes_per_s()

    if streams > 1:
        sets = [arrays(each_set_bytes) for _ in range(streams)]
        each_passes = passes_for(*sets[0])

        def run_all() -> None:
            futures = [pool.submit(_block, triad, x, b, each_passes) for x, b, _ in sets]
            for future in futures:
                future.result()

        together_s = _best_time_s(run_all, settings.repeats)
        moved_bytes = _BYTES_PER_ELEMENT_PASS * sets[0][2] * each_passes * streams
        best_bytes_per_s = max(best_bytes_per_s, moved_bytes / together_s)
    return best_bytes_per_s


def _measure_op_overhead_s(device: Any, settings: _Settings) -> float:
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

    x = jax.device_put(jnp.full((8, 8), 0.1, jnp.float32), device)
    long_ops = settings.overhead_chain_ops
    short, long = chain(1), chain(long_ops + 1)
    repeats = 5 * settings.repeats
    short_s = _best_time_s(lambda: short(x).block_until_ready(), repeats)
    long_s = _best_time_s(lambda: long(x).block_until_ready(), repeats)
    return max(0.0, (long_s - short_s) / long_ops)
