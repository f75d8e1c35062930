"""The measurements behind a calibrated CPU target, taken the way programs run: through `jax.jit`.

Every figure is the time of a compiled JAX call, timed by `best_call_s`: the calls of all kernels
of a step run in rounds interleaved with each other (so a burst of noise hits one round, not one
kernel); each batch starts when other processes leave the CPUs idle; each round times a batch of
back-to-back calls ending in `block_until_ready`; the best per-call time over the rounds counts.
A kernel's net time is its per-call time less the per-call time of a trivial one-element program
(`floor_s`: Python dispatch and one launch).

What is measured (what the working-set cost model, costmodel/working_set.py, needs):

1. `floor_s`: `x + 1` on f32[1].
2. Working-set sweeps over f32[n], 4n doubling from 2 KiB to `sweep_max_bytes` (`sweep_sizes`):
   read `sum(x)` (4n bytes read), write `full((n,), s)` (4n written), copy `x + 1` (4n read and
   4n written); bandwidth = bytes / net time; the working set is every byte the kernel touches.
3. Transcendental throughput: `exp`, `tanh`, `erf`, `log` of f32[n], n in 2^16, 2^18, 2^20
   (elements / net time), and `exp` over sizes from 2^11 to 2^20 elements (how many elements an
   op needs before XLA spreads it over more cores: `parallel_grain_elements`).
4. Loop (vector) throughput: a fused chain of 8 multiply-adds over the same sizes
   (16 flops/element).
5. Matmul throughput per dtype: jitted n x n x n matmuls, n doubling from 32 (2 n^3 flops).
6. Per-op overhead: the slope of the run time of a chain of small unfusable ops (calibration.py).

Before timing, one array just under glibc's largest dynamic mmap threshold (32 MiB) is allocated
and freed, so that later outputs below that size reuse heap memory instead of fresh pages from
the OS (which glibc otherwise decides by the history of earlier allocations; a fresh page costs a
page fault). Outputs of 32 MiB and more always come from fresh pages: the DRAM points of the
write and copy sweeps measure that, as every large output pays it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ProgressFn = Callable[[str], None]

TRANSCENDENTAL_KINDS = ("exponential", "tanh", "erf", "log")
VECTOR_CHAIN_FLOPS_PER_ELEMENT = 16  # 8 x (multiply, add)


@dataclass(frozen=True)
class SweepPoint:
    """One kernel of a working-set sweep: bytes it touches, bytes it moves, the size of its
    output, net seconds."""

    working_set_bytes: int
    moved_bytes: int
    net_s: float
    output_bytes: int = 0

    @property
    def bytes_per_s(self) -> float:
        return self.moved_bytes / self.net_s


@dataclass(frozen=True)
class Measurements:
    """Everything the calibration measured (inputs to `calibration.build_calibrated_target`)."""

    floor_s: float
    op_overhead_s: float
    read: tuple[SweepPoint, ...]
    write: tuple[SweepPoint, ...]
    copy: tuple[SweepPoint, ...]
    transcendental_per_s: dict[str, tuple[tuple[int, float], ...]]  # (elements, elements/s)
    exp_by_elements: tuple[tuple[int, float], ...]  # (elements, elements per second)
    vector_flops_per_s: tuple[tuple[int, float], ...]  # (elements, flops per second)
    reduce_flops_per_s: float
    matmul_flops_per_s: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)
    convolution_units: int = 0  # 0: not measured


@dataclass(frozen=True)
class SweepSettings:
    """Sizes and repeats; `quick` shrinks them for tests."""

    rounds: int
    batch_s: float
    sweep_max_bytes: int
    matmul_max_n: int
    matmul_call_s: float
    quiet: bool  # wait for idle CPUs before each batch (`wait_for_quiet`)

    @staticmethod
    def make(quick: bool) -> SweepSettings:
        if quick:
            return SweepSettings(2, 0.001, 2**21, 256, 0.002, quiet=False)
        return SweepSettings(9, 0.004, 2**27, 2048, 0.03, quiet=True)


# --- timing --------------------------------------------------------------------------------------


def _batch_s(fn: Callable[..., Any], args: Sequence[Any], calls: int) -> float:
    import jax

    start = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def _cpu_busy_fraction(sample_s: float) -> float | None:
    """Fraction of all CPUs' time spent busy over `sample_s` (Linux /proc/stat), else None."""
    def read() -> tuple[int, int] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        ticks = [int(f) for f in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return sum(ticks), idle

    before = read()
    time.sleep(sample_s)
    after = read()
    if before is None or after is None or after[0] == before[0]:
        return None
    total, idle = after[0] - before[0], after[1] - before[1]
    return 1.0 - idle / total


def wait_for_quiet(max_wait_s: float = 30.0, busy_fraction: float = 0.15) -> float:
    """Wait (at most `max_wait_s`) until other processes leave the CPUs idle: over a 0.03 s
    sample while this process sleeps, at most `busy_fraction` of CPU time is busy. Returns the
    seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        busy = _cpu_busy_fraction(0.03)
        if busy is None or busy <= busy_fraction:
            break
        time.sleep(0.2)
    return time.perf_counter() - start


def best_call_s(kernels: Sequence[tuple[Callable[..., Any], Sequence[Any]]], rounds: int,
                batch_s: float, quiet: bool = True) -> list[float]:
    """Best per-call seconds of each compiled `(fn, args)`, over interleaved timing rounds.

    Each kernel runs once untimed (warm-up), then `rounds` times a batch of back-to-back calls
    lasting about `batch_s` (at least one call, at most 2000). With `quiet`, each batch waits
    for the CPUs to be idle first (`wait_for_quiet`): other jobs on a shared machine would
    otherwise take cores that XLA's parallel loops and matmuls count on.
    """
    calls: list[int] = []
    for fn, args in kernels:
        _batch_s(fn, args, 1)
        once_s = _batch_s(fn, args, 1)
        calls.append(max(1, min(2000, int(batch_s / max(once_s, 1e-7)))))
    best = [math.inf] * len(kernels)
    for _ in range(rounds):
        for i, (fn, args) in enumerate(kernels):
            if quiet and wait_for_quiet() > 0.0:
                _batch_s(fn, args, 1)  # the cores were idle: wake them before timing
            best[i] = min(best[i], _batch_s(fn, args, calls[i]))
    return best


def settle_allocator() -> None:
    """Raise glibc's dynamic mmap threshold to its maximum (module docstring)."""
    import jax.numpy as jnp

    big = jnp.zeros((31 * 2**20 // 4,), jnp.float32)
    big.block_until_ready()
    del big


def trivial_kernel() -> tuple[Callable[..., Any], list[Any]]:
    """The trivial one-element program whose per-call time is the floor (dispatch, one launch)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda x: x + 1.0), [jnp.ones((1,), jnp.float32)]


def floor_s(rounds: int, quiet: bool = True) -> float:
    """Per-call seconds of the trivial program (`trivial_kernel`)."""
    return best_call_s([trivial_kernel()], max(rounds, 3), 0.01, quiet)[0]


def net_call_s(kernels: Sequence[tuple[Callable[..., Any], Sequence[Any]]],
               settings: SweepSettings) -> list[float]:
    """Net seconds of each kernel: its best per-call time less the trivial program's, timed in
    the same interleaved rounds (so both see the same conditions); at least 10 ns."""
    times = best_call_s([trivial_kernel(), *kernels], settings.rounds, settings.batch_s,
                        settings.quiet)
    return [max(t - times[0], 1e-8) for t in times[1:]]


# --- the sweeps ----------------------------------------------------------------------------------


FIRST_TOUCH_MIN_BYTES = 32 * 2**20  # glibc's largest dynamic mmap threshold (64-bit)


def sweep_sizes(max_bytes: int, min_bytes: int = 2048) -> list[int]:
    """Element counts of the f32 sweep arrays: 4n bytes from `min_bytes` doubling to `max_bytes`,
    plus 1.5x each size from 8 MiB (so that DRAM-sized working sets with outputs below
    `FIRST_TOUCH_MIN_BYTES` are measured too)."""
    out = []
    nbytes = min_bytes
    while nbytes <= max_bytes:
        out.append(nbytes // 4)
        if nbytes >= 8 * 2**20 and 3 * nbytes // 2 <= max_bytes:
            out.append(3 * nbytes // 8)
        nbytes *= 2
    return out


def measure_sweeps(settings: SweepSettings
                   ) -> tuple[tuple[SweepPoint, ...], tuple[SweepPoint, ...],
                              tuple[SweepPoint, ...]]:
    """The read (sum), write (fill) and copy (`x + 1`) working-set sweeps."""
    import jax
    import jax.numpy as jnp

    sizes = sweep_sizes(settings.sweep_max_bytes)
    kernels: list[tuple[Callable[..., Any], Sequence[Any]]] = []
    for n in sizes:
        x = jnp.linspace(0.0, 1.0, n, dtype=jnp.float32)
        s = jnp.float32(0.5)
        kernels.append((jax.jit(jnp.sum), [x]))
        kernels.append((jax.jit(lambda v, n=n: jnp.full((n,), v, jnp.float32)), [s]))
        kernels.append((jax.jit(lambda v: v + 1.0), [x]))
    times = net_call_s(kernels, settings)
    read, write, copy = [], [], []
    for i, n in enumerate(sizes):
        nbytes = 4 * n
        r, w, c = times[3 * i:3 * i + 3]
        read.append(SweepPoint(nbytes, nbytes, r, 4))
        write.append(SweepPoint(nbytes, nbytes, w, nbytes))
        copy.append(SweepPoint(2 * nbytes, 2 * nbytes, c, nbytes))
    return tuple(read), tuple(write), tuple(copy)


def measure_elementwise(settings: SweepSettings
                        ) -> tuple[dict[str, tuple[tuple[int, float], ...]],
                                   tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
    """Throughput by size: (elements/s of each transcendental kind, elements/s of exp over the
    grain-fit sizes, flops/s of the multiply-add chain); each as (elements, rate) pairs."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    quick = not settings.quiet
    ref_sizes = [2**14, 2**16] if quick else [2**16, 2**18, 2**20]
    curve_sizes = [2**11, 2**14] if quick else [2**k for k in range(11, 21)]
    fns = {"exponential": jnp.exp, "tanh": jnp.tanh, "erf": lax.erf, "log": jnp.log}

    def chain(v: Any) -> Any:
        for _ in range(VECTOR_CHAIN_FLOPS_PER_ELEMENT // 2):
            v = v * 0.999 + 0.001
        return v

    def data(n: int) -> Any:
        return jnp.linspace(0.1, 2.0, n, dtype=jnp.float32)

    jitted = {k: jax.jit(f) for k, f in fns.items()}
    jit_chain = jax.jit(chain)
    plan: list[tuple[str, int]] = [(k, n) for k in TRANSCENDENTAL_KINDS if k != "exponential"
                                   for n in ref_sizes]
    plan += [("chain", n) for n in ref_sizes]
    plan += [("exponential", n) for n in sorted(set(curve_sizes) | set(ref_sizes))]
    kernels: list[tuple[Callable[..., Any], Sequence[Any]]] = [
        (jit_chain if k == "chain" else jitted[k], [data(n)]) for k, n in plan]
    times = net_call_s(kernels, settings)
    rates: dict[str, list[tuple[int, float]]] = {}
    for (kind, n), t in zip(plan, times, strict=True):
        per = VECTOR_CHAIN_FLOPS_PER_ELEMENT if kind == "chain" else 1
        rates.setdefault(kind, []).append((n, per * n / t))
    trans = {k: tuple(p for p in rates[k] if k != "exponential" or p[0] in ref_sizes)
             for k in TRANSCENDENTAL_KINDS}
    curve = tuple(p for p in rates["exponential"] if p[0] in curve_sizes)
    return trans, curve, tuple(rates["chain"])


def measure_matmuls(dtypes: Sequence[str], settings: SweepSettings
                    ) -> dict[str, tuple[tuple[int, float], ...]]:
    """FLOP/s of n x n x n matmuls per dtype, n doubling from 32 until a call lasts
    `matmul_call_s` or n reaches `matmul_max_n`; dtypes the backend cannot run are left out."""
    import jax
    import jax.numpy as jnp

    names = {"f32": jnp.float32, "f64": jnp.float64, "bf16": jnp.bfloat16, "f16": jnp.float16}
    out: dict[str, tuple[tuple[int, float], ...]] = {}
    for dtype in dtypes:
        points: list[tuple[int, float]] = []
        with jax.enable_x64(dtype == "f64"):
            matmul = jax.jit(jnp.matmul)
            n = 32
            try:
                while n <= settings.matmul_max_n:
                    a = jnp.full((n, n), 0.5, dtype=names[dtype])
                    b = jnp.full((n, n), 0.25, dtype=names[dtype])
                    net_s = net_call_s([(matmul, [a, b])], settings)[0]
                    points.append((n, 2.0 * n**3 / net_s))
                    if net_s >= settings.matmul_call_s:
                        break
                    n *= 2
            except Exception:  # XLA raises various errors for a dtype it cannot run: skip it
                pass
        if points:
            out[dtype] = tuple(points)
    return out


def busy_units(fn: Callable[..., Any], args: Sequence[Any], duration_s: float,
               quiet: bool = True) -> float:
    """Units a compiled call keeps busy: this process's CPU time (user + system) over the wall
    time while `fn(*args)` runs back to back for about `duration_s` (with `quiet`, after the
    CPUs are idle)."""
    import resource

    import jax

    def cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    jax.block_until_ready(fn(*args))
    if quiet:
        wait_for_quiet()
    wall0, cpu0 = time.perf_counter(), cpu_s()
    while time.perf_counter() - wall0 < duration_s:
        jax.block_until_ready(fn(*args))
    return (cpu_s() - cpu0) / (time.perf_counter() - wall0)


def measure_convolution_units(settings: SweepSettings, units: int) -> int:
    """Units one convolution keeps busy (module docstring, step 7): `busy_units` of a 3x3
    convolution of f32[2, 40, 40, 48] with 48 output channels, rounded, between 1 and `units`."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def conv(x: Any, w: Any) -> Any:
        return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    args = [jnp.full((2, 40, 40, 48), 0.5, jnp.float32),
            jnp.full((3, 3, 48, 48), 0.25, jnp.float32)]
    busy = busy_units(jax.jit(conv), args, 0.4 if settings.quiet else 0.05, settings.quiet)
    return max(1, min(units, round(busy)))


def fit_parallel_grain(curve: Sequence[tuple[int, float]], units: int) -> float:
    """The `parallel_grain_elements` g that best explains `curve` (elements, elements/s):
    rate(n) = R x min(units, max(1, n / g)), with R (the one-unit rate) fitted for each g, by
    least squares in log rate over a log-spaced grid of g from 256 to 2^24 (the smallest g of
    the best fit). 0 when there is one unit or no curve."""
    if units <= 1 or not curve:
        return 0.0
    best_g, best_err = 0.0, math.inf
    for step in range(0, 65):
        g = 256.0 * 2 ** (step / 4)
        logs = [math.log(rate / min(units, max(1.0, n / g))) for n, rate in curve]
        mean = sum(logs) / len(logs)
        err = sum((v - mean) ** 2 for v in logs)
        if err < best_err - 1e-12:
            best_g, best_err = g, err
    return best_g
