"""Cost-model accuracy on this CPU: measured `jax.jit` times against the model's predictions.

Run: `python benchmarks/costmodel_cpu.py [--target FILE.toml] [--quick] [--markdown]`.

1. The target: `tiermap.costmodel.calibration.calibrate()` measures this machine (peak FLOP/s,
   cache and DRAM bandwidth, per-op overhead), unless `--target` names a target file.
2. Each case of an operator suite (matmuls small to large and tall-skinny, elementwise ops from
   L1- to DRAM-sized, softmax, reductions, convolutions, attention at several lengths) is lowered
   with `tiermap.frontend.lowering.lower` and predicted:
   - kernels as XLA's CPU backend forms them (`xla_like_fusion`): each contraction alone; each
     maximal run of other ops one loop fusion, cut after a reduce (its result is materialized);
   - each kernel's external tensors in the fastest tier whose capacity holds the kernel's working
     set (what a cache does), except the program's outputs: each call writes them into newly
     allocated buffers, which no cache holds, so they go to the main-memory tier;
   - then `op_cost`/`group_cost`; the program time is the sum over kernels.
   `--write-allocate` also halves main-memory write bandwidth (a store that misses the caches
   first reads its line), a correction the calibrated STREAM triad does not see.
3. Each case is run through `jax.jit` (compiled once) in several rounds spread over the whole run,
   each round timing a batch of back-to-back calls ending in `block_until_ready`; the best per-call
   time counts. The fixed cost of a call (Python dispatch) is removed: measured = per-call time −
   per-call time of a trivial one-op program + `op_overhead_s` (that program's own kernel).
4. It prints op, shape, measured, predicted, log2(pred/measured) and the bound (compute or memory),
   then the Spearman rank correlation and the median |log2(pred/measured)|.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tiermap.costmodel.fidelity import xla_like_fusion
from tiermap.costmodel.roofline import (
    compute_time_s,
    group_cost,
    group_io,
    memory_time_s,
    op_cost,
    op_io,
)
from tiermap.frontend.lowering import lower
from tiermap.hardware.target import Target
from tiermap.ir.program import Program

F32 = jnp.float32


@dataclass(frozen=True)
class Case:
    """One operator instance: a function and the shapes of its arguments."""

    op: str
    shape: str
    fn: Callable[..., Any]
    args: tuple[jax.ShapeDtypeStruct, ...]


@dataclass(frozen=True)
class Prediction:
    """The model's time for one case and what bounds it."""

    time_s: float
    compute_s: float
    memory_s: float
    bound: str
    kernels: int


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    case: Case
    measured_s: float
    prediction: Prediction

    @property
    def log2_ratio(self) -> float:
        return math.log2(self.prediction.time_s / self.measured_s)


# --- the suite -----------------------------------------------------------------------------------


def _sds(*shape: int, dtype: Any = F32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("hqd,hkd->hqk", q, k) * scale
    return jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(s, axis=-1), v)


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 2)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def suite(quick: bool = False) -> list[Case]:
    """The operator suite; `quick` keeps the small half (for smoke tests)."""
    cases: list[Case] = []
    for n in (32, 64, 128, 256, 512, 1024, 2048):
        cases.append(Case("matmul", f"{n}x{n}x{n}", lambda a, b: a @ b, (_sds(n, n), _sds(n, n))))
    for m, k, n in ((65536, 64, 64), (16384, 1024, 16), (1, 4096, 4096), (64, 8192, 64)):
        cases.append(Case("matmul", f"{m}x{k}x{n}", lambda a, b: a @ b,
                          (_sds(m, k), _sds(k, n))))
    for n in (2**10, 2**13, 2**16, 2**19, 2**22, 2**24):
        cases.append(Case("add", f"{n}", lambda a, b: a + b, (_sds(n), _sds(n))))
    for n in (2**13, 2**17, 2**21, 2**23):
        cases.append(Case("exp", f"{n}", jnp.exp, (_sds(n),)))
        cases.append(Case("tanh", f"{n}", jnp.tanh, (_sds(n),)))
    for rows, cols in ((64, 256), (512, 512), (2048, 2048), (4096, 4096)):
        cases.append(Case("softmax", f"{rows}x{cols}", lambda x: jax.nn.softmax(x, axis=-1),
                          (_sds(rows, cols),)))
    for rows, cols in ((256, 256), (2048, 2048), (8192, 2048)):
        cases.append(Case("sum rows", f"{rows}x{cols}", lambda x: jnp.sum(x, axis=1),
                          (_sds(rows, cols),)))
        cases.append(Case("sum all", f"{rows}x{cols}", jnp.sum, (_sds(rows, cols),)))
    for n, hw, cin, cout in ((1, 16, 16, 16), (1, 56, 64, 64), (8, 28, 128, 128)):
        cases.append(Case("conv3x3", f"{n}x{hw}x{hw}x{cin}->{cout}", _conv,
                          (_sds(n, hw, hw, cin), _sds(3, 3, cin, cout))))
    for length in (128, 512, 1024, 2048):
        shape = (8, length, 64)
        cases.append(Case("attention", f"8x{length}x64", _attention,
                          (_sds(*shape), _sds(*shape), _sds(*shape))))
    if quick:
        cases = [c for c in cases if math.prod(a.size for a in c.args) ** (1 / len(c.args))
                 <= 2**18]
    return cases


# --- the model -----------------------------------------------------------------------------------


def _cache_tier(working_set_bytes: float, target: Target) -> str:
    """The fastest tier whose capacity holds the working set (the last tier otherwise)."""
    for tier in target.tiers:
        if tier.capacity_bytes >= working_set_bytes:
            return tier.name
    return target.tiers[-1].name


def predict(program: Program, target: Target, fresh_outputs: bool = True) -> Prediction:
    """The model's time for a whole program on a cache hierarchy (module docstring, step 2).

    With `fresh_outputs`, the program's outputs (new buffers each call, so in no cache) are written
    to the main-memory tier; everything else sits in the fastest tier holding its kernel's
    working set.
    """
    fusion = xla_like_fusion(program)
    group_of = fusion.group_of()
    done: set[str] = set()
    total_s = compute_s = memory_s = 0.0
    kernels = 0
    main = target.main_tier.name
    outputs = set(program.outputs) if fresh_outputs else set()
    for op in program.ops:
        group = group_of.get(op.id)
        if group is not None and group.id in done:
            continue
        io = group_io(group, program) if group is not None else op_io(op, program)
        tensors = {vid for vid, _, _ in io.reads} | {vid for vid, _, _ in io.writes}
        working_set_bytes = sum(program.values[v].nbytes for v in tensors)
        if working_set_bytes == 0 and not io.reads:
            continue  # a constant: folded into its consumer by XLA
        tier = _cache_tier(working_set_bytes, target)
        tier_of = {v: (main if v in outputs else tier) for v in tensors}
        if group is not None:
            done.add(group.id)
            cost = group_cost(group, program, target, tier_of)
            comp = sum(compute_time_s(program.op(o), target) for o in group.op_ids)
        else:
            cost = op_cost(op, program, target, [tier_of[v] for v in op.inputs],
                           [tier_of[v] for v in op.outputs])
            comp = compute_time_s(op, target)
        mem = memory_time_s(_by_tier(io.reads, tier_of), _by_tier(io.writes, tier_of), target)
        total_s += cost.time_s
        compute_s += comp
        memory_s += mem
        kernels += 1
    bound = "compute" if compute_s >= memory_s else "memory"
    return Prediction(total_s, compute_s, memory_s, bound, kernels)


def _by_tier(entries: Sequence[tuple[str, int, float]], tier_of: dict[str, str]
             ) -> dict[str, float]:
    out: dict[str, float] = {}
    for vid, _, nbytes in entries:
        out[tier_of[vid]] = out.get(tier_of[vid], 0.0) + nbytes
    return out


def with_write_allocate(target: Target, factor: float = 2.0) -> Target:
    """The target with main-memory writes `factor` times slower: a store that misses the caches
    first reads the line (write-allocate), then writes it back."""
    tiers = tuple(replace(t, write_bytes_per_s=t.write_bytes_per_s / factor)
                  if t.name == target.main_tier.name else t for t in target.tiers)
    return replace(target, tiers=tiers)


# --- measuring -----------------------------------------------------------------------------------


def _concrete(args: Sequence[jax.ShapeDtypeStruct], seed: int = 0) -> list[jax.Array]:
    key = jax.random.PRNGKey(seed)
    out = []
    for i, a in enumerate(args):
        out.append(jax.random.normal(jax.random.fold_in(key, i), a.shape, a.dtype))
    return out


class Timer:
    """Best per-call time of compiled functions, in rounds interleaved across all cases."""

    def __init__(self, batch_s: float) -> None:
        self.batch_s = batch_s

    def batch(self, compiled: Any, arrays: Sequence[jax.Array], calls: int) -> float:
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = compiled(*arrays)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / calls

    def calls_for(self, compiled: Any, arrays: Sequence[jax.Array]) -> int:
        once_s = self.batch(compiled, arrays, 1)
        return max(1, min(1000, int(self.batch_s / max(once_s, 1e-7))))


def measure(cases: Sequence[Case], rounds: int, batch_s: float,
            progress: Callable[[str], None] | None = None) -> tuple[list[float], float]:
    """Best per-call seconds of every case and of the trivial program, over interleaved rounds."""
    timer = Timer(batch_s)
    trivial = jax.jit(lambda x: x + 1.0).lower(_sds(1)).compile()
    tiny = _concrete([_sds(1)])
    compiled = []
    for case in cases:
        if progress is not None:
            progress(f"compiling {case.op} {case.shape}")
        fn = jax.jit(case.fn).lower(*case.args).compile()
        arrays = _concrete(case.args)
        jax.block_until_ready(fn(*arrays))
        compiled.append((fn, arrays, timer.calls_for(fn, arrays)))
    best = [math.inf] * len(cases)
    floor_s = math.inf
    for r in range(rounds):
        if progress is not None:
            progress(f"round {r + 1}/{rounds}")
        floor_s = min(floor_s, timer.batch(trivial, tiny, 2000))
        for i, (fn, arrays, calls) in enumerate(compiled):
            best[i] = min(best[i], timer.batch(fn, arrays, calls))
    return best, floor_s


# --- statistics ----------------------------------------------------------------------------------


def ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    arr = np.asarray(x, dtype=float)
    order = np.argsort(arr, kind="mergesort")
    out = np.empty(len(arr))
    sorted_vals = arr[order]
    i = 0
    while i < len(arr):
        j = i
        while j + 1 < len(arr) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        out[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


# --- report --------------------------------------------------------------------------------------


def _fmt_s(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def table(rows: Sequence[Row], markdown: bool) -> str:
    """The per-case table (plain text or markdown)."""
    head = ["op", "shape", "measured", "predicted", "log2(pred/meas)", "bound", "kernels"]
    body = [[r.case.op, r.case.shape, _fmt_s(r.measured_s), _fmt_s(r.prediction.time_s),
             f"{r.log2_ratio:+.2f}", r.prediction.bound, str(r.prediction.kernels)]
            for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
              for cells in body]
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> tuple[float, float]:
    """(Spearman rank correlation, median |log2(pred/measured)|)."""
    rho = spearman([r.measured_s for r in rows], [r.prediction.time_s for r in rows])
    med = float(np.median([abs(r.log2_ratio) for r in rows]))
    return rho, med


def _load_target(path: str | None, quick: bool) -> Target:
    if path is not None:
        from tiermap.hardware import load_target

        return load_target(path)
    from tiermap.costmodel.calibration import calibrate

    return calibrate(quick=quick)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="a target .toml (default: calibrate this machine)")
    parser.add_argument("--quick", action="store_true", help="small cases, fewer rounds")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7)")
    parser.add_argument("--write-allocate", action="store_true",
                        help="halve main-memory write bandwidth in the prediction")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    load_before = os.getloadavg()[0]
    target = _load_target(args.target, args.quick)
    cases = suite(args.quick)
    programs = [lower(c.fn, *c.args) for c in cases]
    model_target = with_write_allocate(target) if args.write_allocate else target
    predictions = [predict(p, model_target) for p in programs]
    best_s, floor_s = measure(cases, rounds, 0.002 if args.quick else 0.02)
    call_s = floor_s - target.op_overhead_s
    rows = [Row(c, max(b - call_s, 1e-9), pred)
            for c, b, pred in zip(cases, best_s, predictions, strict=True)]
    print(f"# {datetime.date.today().isoformat()} {platform.machine()} "
          f"{target.description}")
    print(f"# target {target.name}: peak f32 {target.peak('f32'):.3g} FLOP/s, "
          + ", ".join(f"{t.name} {t.capacity_bytes / 2**20:.3g} MiB "
                      f"{t.read_bytes_per_s / 1e9:.3g} GB/s" for t in target.tiers)
          + f", op overhead {target.op_overhead_s * 1e6:.3g} µs")
    print(f"# call floor {floor_s * 1e6:.3g} µs (trivial program), subtracted less one overhead;"
          f" load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(table(rows, args.markdown))
    rho, med = summary(rows)
    print(f"\nSpearman rank correlation: {rho:.3f}   median |log2(pred/measured)|: {med:.3f}"
          f"   cases: {len(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
