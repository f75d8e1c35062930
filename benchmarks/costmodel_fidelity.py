"""Cost-model fidelity on this CPU: a held-out op suite, predicted vs measured, measured twice.

Run: `python benchmarks/costmodel_fidelity.py [--target FILE.toml] [--plot out/fidelity.png]
[--rounds 9] [--suite heldout|dev] [--markdown]`.

1. The target: `tiermap.costmodel.calibration.calibrate()` measures this machine (working-set
   sweeps, matmul, transcendental, loop and reduction throughput, per-op overhead), unless
   `--target` names a calibrated target file. `--save-target` writes what was measured.
2. The suite: benchmarks/heldout_ops.py (24 cases, none a kernel the calibration times; set
   aside before the model was tuned). `--suite dev` runs benchmarks/costmodel_cpu.py's suite
   instead, the one the model's structure was developed on.
3. Prediction: each case lowered by tiermap's frontend; kernels as XLA's CPU backend forms them
   (`costmodel_cpu.xla_like_fusion`); every tensor in the main-memory tier; each kernel costed
   by `roofline.op_cost` / `group_cost`, which for a calibrated target charge its bytes at the
   tier its working set fits in (costmodel/working_set.py); the case's time is the sum.
4. Measurement, twice in one run (repeat 1, then repeat 2): each case compiled once, then timed
   by `calibration_sweeps.best_call_s` (best of `--rounds` interleaved rounds, each after the
   CPUs are idle); measured = best per-call time - the per-call time of a trivial one-element
   program (timed in the same rounds) + `op_overhead_s` (that program's own kernel).
5. It prints per case predicted, measured (both repeats) and log2(predicted / measured), then per
   repeat the median |log2 error|, Spearman's rank correlation, the worst case and the cases
   off by more than 2x; and plots predicted against measured (`--plot`).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from costmodel_cpu import spearman, xla_like_fusion  # noqa: E402
from heldout_ops import Case, heldout_suite  # noqa: E402

from tiermap.costmodel import working_set  # noqa: E402
from tiermap.costmodel.calibration_sweeps import (  # noqa: E402
    best_call_s,
    settle_allocator,
    trivial_kernel,
)
from tiermap.costmodel.roofline import (  # noqa: E402
    compute_time_s,
    group_cost,
    group_io,
    op_cost,
    op_io,
)
from tiermap.frontend.lowering import lower  # noqa: E402
from tiermap.hardware.target import Target  # noqa: E402
from tiermap.ir.program import Program  # noqa: E402


@dataclass(frozen=True)
class Prediction:
    """The model's time for one case, and what bounds it."""

    time_s: float
    compute_s: float
    memory_s: float
    kernels: int

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def predict(program: Program, target: Target) -> Prediction:
    """The model's time for a program: XLA-like kernels, tensors in main memory (step 3)."""
    fusion = xla_like_fusion(program)
    group_of = fusion.group_of()
    main = target.main_tier.name
    done: set[str] = set()
    total_s = compute_s = memory_s = 0.0
    kernels = 0
    for op in program.ops:
        group = group_of.get(op.id)
        if group is not None and group.id in done:
            continue
        io = group_io(group, program) if group is not None else op_io(op, program)
        if not io.reads and sum(b for _, _, b in io.writes) == 0:
            continue  # a constant: folded into its consumer by XLA
        if not io.reads and all(program.values[v].nbytes <= 64 for v, _, _ in io.writes):
            continue  # a small constant
        reads: dict[str, float] = {main: sum(b for _, _, b in io.reads)}
        writes: dict[str, float] = {main: sum(b for _, _, b in io.writes)}
        if group is not None:
            done.add(group.id)
            tier_of = {vid: main for vid, _, _ in (*io.reads, *io.writes)}
            cost = group_cost(group, program, target, tier_of)
            comp = sum(compute_time_s(program.op(o), target) for o in group.op_ids)
        else:
            cost = op_cost(op, program, target, [main] * len(op.inputs),
                           [main] * len(op.outputs))
            comp = compute_time_s(op, target)
        total_s += cost.time_s
        compute_s += comp
        memory_s += (working_set.memory_time_s(reads, writes, target)
                     if working_set.applies(target) else 0.0)
        kernels += 1
    return Prediction(total_s, compute_s, memory_s, kernels)


def _concrete(args: Sequence[jax.ShapeDtypeStruct], seed: int = 0) -> list[jax.Array]:
    key = jax.random.PRNGKey(seed)
    return [jax.random.normal(jax.random.fold_in(key, i), a.shape, a.dtype)
            for i, a in enumerate(args)]


def measure(cases: Sequence[Case], rounds: int, batch_s: float, overhead_s: float
            ) -> list[float]:
    """Net seconds per case (step 4): best per-call time - floor + one op overhead."""
    kernels: list[tuple[Any, Sequence[Any]]] = []
    for case in cases:
        fn = jax.jit(case.fn).lower(*case.args).compile()
        kernels.append((fn, _concrete(case.args)))
    best = best_call_s([trivial_kernel(), *kernels], rounds, batch_s)
    return [max(b - best[0] + overhead_s, 1e-9) for b in best[1:]]


@dataclass(frozen=True)
class Stats:
    """Fidelity figures of one repeat."""

    median_abs_log2: float
    spearman: float
    worst: str
    worst_log2: float
    over_2x: int


def stats(cases: Sequence[Case], predicted_s: Sequence[float], measured_s: Sequence[float]
          ) -> Stats:
    errors = [math.log2(p / m) for p, m in zip(predicted_s, measured_s, strict=True)]
    worst = max(range(len(errors)), key=lambda i: abs(errors[i]))
    return Stats(float(np.median([abs(e) for e in errors])),
                 spearman(list(measured_s), list(predicted_s)),
                 f"{cases[worst].op} {cases[worst].shape}", errors[worst],
                 sum(abs(e) > 1.0 for e in errors))


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def table(cases: Sequence[Case], preds: Sequence[Prediction], runs: Sequence[Sequence[float]],
          markdown: bool) -> str:
    head = ["op", "shape", "predicted"]
    for r in range(len(runs)):
        head += [f"measured {r + 1}", f"log2 err {r + 1}"]
    head += ["bound", "kernels"]
    body = []
    for i, (case, pred) in enumerate(zip(cases, preds, strict=True)):
        cells = [case.op, case.shape, _fmt_s(pred.time_s)]
        for run in runs:
            cells += [_fmt_s(run[i]), f"{math.log2(pred.time_s / run[i]):+.2f}"]
        body.append([*cells, pred.bound, str(pred.kernels)])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
                     for cells in [head, *body])


def plot(path: Path, cases: Sequence[Case], preds: Sequence[Prediction],
         runs: Sequence[Sequence[float]], title: str) -> None:
    """Predicted against measured, log-log, both repeats, with the 2x band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6.5))
    predicted = [p.time_s for p in preds]
    for r, (run, marker) in enumerate(zip(runs, ("o", "x"), strict=False)):
        ax.scatter(run, predicted, marker=marker, label=f"repeat {r + 1}", alpha=0.8)
    for case, pred, meas in zip(cases, preds, runs[0], strict=True):
        ax.annotate(f"{case.op} {case.shape}", (meas, pred.time_s), fontsize=6,
                    xytext=(3, 2), textcoords="offset points")
    lo = min(min(predicted), *(min(r) for r in runs)) / 2
    hi = max(max(predicted), *(max(r) for r in runs)) * 2
    grid = np.geomspace(lo, hi, 10)
    ax.plot(grid, grid, "k-", lw=0.8, label="predicted = measured")
    ax.plot(grid, grid * 2, "k:", lw=0.6, label="2x off")
    ax.plot(grid, grid / 2, "k:", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (s)")
    ax.set_ylabel("predicted (s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _dev_suite() -> list[Case]:
    from costmodel_cpu import suite

    return [Case(c.op, c.shape, c.fn, c.args) for c in suite()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--target", help="a calibrated target .toml (default: calibrate now)")
    parser.add_argument("--save-target", help="write the calibrated target here")
    parser.add_argument("--plot", default="out/costmodel_fidelity.png", help="plot path")
    parser.add_argument("--rounds", type=int, default=9, help="best of N rounds (default 9)")
    parser.add_argument("--repeats", type=int, default=2, help="measurement repeats (default 2)")
    parser.add_argument("--suite", choices=("heldout", "dev"), default="heldout")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    if args.target:
        from tiermap.hardware import load_target

        target = load_target(args.target)
    else:
        from tiermap.costmodel.calibration import calibrate, target_to_toml

        target = calibrate()
        if args.save_target:
            Path(args.save_target).write_text(target_to_toml(target))
    settle_allocator()
    cases = heldout_suite() if args.suite == "heldout" else _dev_suite()
    preds = [predict(lower(c.fn, *c.args), target) for c in cases]
    runs = [measure(cases, args.rounds, 0.01, target.op_overhead_s)
            for _ in range(args.repeats)]
    print(f"# {datetime.datetime.now(datetime.UTC).isoformat(timespec='minutes')} "
          f"{platform.machine()}: {target.description}")
    print(f"# target {target.name}: " + ", ".join(
        f"{t.name} {t.capacity_bytes / 2**20:.3g} MiB r {t.read_bytes_per_s / 1e9:.3g} "
        f"w {t.write_bytes_per_s / 1e9:.3g} GB/s" for t in target.tiers)
        + f"; op overhead {target.op_overhead_s * 1e6:.3g} µs")
    print(f"# suite {args.suite}: {len(cases)} cases, best of {args.rounds} rounds, "
          f"{args.repeats} repeats; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print(table(cases, preds, runs, args.markdown))
    print()
    for r, run in enumerate(runs):
        s = stats(cases, [p.time_s for p in preds], run)
        print(f"repeat {r + 1}: median |log2 err| {s.median_abs_log2:.3f}  Spearman "
              f"{s.spearman:.3f}  worst {s.worst} ({s.worst_log2:+.2f}, "
              f"{2 ** abs(s.worst_log2):.2f}x)  cases off by > 2x: {s.over_2x}")
    if args.plot:
        s = stats(cases, [p.time_s for p in preds], runs[0])
        plot(Path(args.plot), cases, preds, runs,
             f"tiermap cost model vs measured, {args.suite} suite on {target.name}: median "
             f"|log2 err| {s.median_abs_log2:.2f}, Spearman {s.spearman:.3f} (repeat 1)")
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
