"""The cost model's fidelity check: a held-out op suite, predicted against measured on this CPU.

`tiermap calibrate --check` and benchmarks/costmodel_fidelity.py both run `check`:

1. Prediction (`predict`): each case lowered by tiermap's frontend; kernels as XLA's CPU backend
   forms them (`xla_like_fusion`); every tensor in the main-memory tier; each kernel costed by
   `roofline.op_cost` / `group_cost`, which for a calibrated target (`working_set_tiers`) charge
   its bytes at the tier its working set fits in (costmodel/working_set.py); the case's time is
   the sum over its kernels.
2. Measurement (`measure`), `repeats` times in one run: each case compiled once, then timed by
   `calibration_sweeps.best_call_s` (best of `rounds` interleaved rounds, each batch after the
   CPUs are idle); measured = best per-call time - the per-call time of a trivial one-element
   program (timed in the same rounds) + `op_overhead_s` (that program's own kernel).
3. Figures per repeat (`stats`): the median |log2(predicted / measured)|, Spearman's rank
   correlation of predicted and measured, the worst case, and the cases off by more than 2x;
   the goals (`GOALS`) are issue 21's.

Nothing here prints or plots (the CLI and tiermap.plots do); jax loads inside the functions.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tiermap.costmodel import working_set
from tiermap.costmodel.calibration_sweeps import best_call_s, settle_allocator, trivial_kernel
from tiermap.costmodel.roofline import (
    CONTRACTIONS,
    compute_time_s,
    group_cost,
    group_io,
    op_cost,
    op_io,
)
from tiermap.frontend.lowering import lower
from tiermap.ir.fusion import Fusion, FusionGroup

if TYPE_CHECKING:
    from tiermap.costmodel.fidelity_suites import Case
    from tiermap.hardware.target import Target
    from tiermap.ir.program import Program


@dataclass(frozen=True)
class Goals:
    """What a fidelity check must show (issue 21): median |log2 err|, rank correlation, worst."""

    median_abs_log2: float = 0.3
    spearman: float = 0.97
    worst_abs_log2: float = 1.0  # no case worse than 2x


GOALS = Goals()


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


@dataclass(frozen=True)
class Stats:
    """Fidelity figures of one repeat."""

    median_abs_log2: float
    spearman: float
    worst: str
    worst_log2: float
    over_2x: int

    def meets(self, goals: Goals = GOALS) -> bool:
        return (self.median_abs_log2 <= goals.median_abs_log2
                and self.spearman >= goals.spearman
                and abs(self.worst_log2) <= goals.worst_abs_log2)


@dataclass(frozen=True)
class CheckResult:
    """A whole check: the cases, their predictions, the measured seconds of each repeat."""

    suite: str
    rounds: int
    cases: tuple[Case, ...]
    predictions: tuple[Prediction, ...]
    measured_s: tuple[tuple[float, ...], ...]  # [repeat][case]

    @property
    def stats(self) -> tuple[Stats, ...]:
        predicted = [p.time_s for p in self.predictions]
        return tuple(stats(self.cases, predicted, run) for run in self.measured_s)

    def meets(self, goals: Goals = GOALS) -> bool:
        """Whether every repeat meets every goal."""
        return all(s.meets(goals) for s in self.stats)


# --- prediction -----------------------------------------------------------------------------------


def xla_like_fusion(program: Program) -> Fusion:
    """Kernels as XLA's CPU backend forms them, roughly.

    Each contraction is a kernel of its own; every maximal run of other ops is one loop fusion,
    cut after a reduce (its result is materialized); constants and reshapes are free and join the
    run they sit in. A run's tensors used only inside it are internal.
    """
    runs: list[list[int]] = []
    current: list[int] = []
    for op in program.ops:
        if op.kind in CONTRACTIONS:
            if current:
                runs.append(current)
            runs.append([op.step])
            current = []
            continue
        current.append(op.step)
        if op.kind == "stablehlo.reduce":
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    outputs = set(program.outputs)
    groups = []
    for steps in runs:
        if len(steps) < 2:
            continue
        inside = set(steps)
        internal = frozenset(
            vid for s in steps for vid in program.ops[s].outputs
            if vid not in outputs and program.consumers[vid]
            and all(c in inside for c in program.consumers[vid]))
        groups.append(FusionGroup(f"k{steps[0]}", "loop", tuple(f"op{s}" for s in steps),
                                  internal))
    return Fusion(tuple(groups))


def predict(program: Program, target: Target) -> Prediction:
    """The model's time for a program: XLA-like kernels, tensors in main memory (step 1)."""
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


def predict_cases(cases: Sequence[Case], target: Target) -> list[Prediction]:
    """`predict` for each case, lowered for the CPU."""
    return [predict(lower(c.fn, *c.args()), target) for c in cases]


# --- measurement ----------------------------------------------------------------------------------


def _concrete(args: Sequence[Any], seed: int = 0) -> list[Any]:
    import jax

    key = jax.random.PRNGKey(seed)
    return [jax.random.normal(jax.random.fold_in(key, i), a.shape, a.dtype)
            for i, a in enumerate(args)]


def measure(cases: Sequence[Case], rounds: int, batch_s: float, overhead_s: float,
            quiet: bool = True) -> list[float]:
    """Net seconds per case (step 2): best per-call time - floor + one op overhead."""
    import jax

    kernels: list[tuple[Any, Sequence[Any]]] = []
    for case in cases:
        args = case.args()
        fn = jax.jit(case.fn).lower(*args).compile()
        kernels.append((fn, _concrete(args)))
    best = best_call_s([trivial_kernel(), *kernels], rounds, batch_s, quiet)
    return [max(b - best[0] + overhead_s, 1e-9) for b in best[1:]]


def check(target: Target, cases: Sequence[Case], *, suite: str, rounds: int = 9,
          repeats: int = 2, batch_s: float = 0.01, quiet: bool = True,
          progress: Callable[[str], None] | None = None) -> CheckResult:
    """Predict every case on `target`, then measure them `repeats` times (module docstring)."""
    settle_allocator()
    if progress is not None:
        progress("predicting")
    predictions = predict_cases(cases, target)
    runs = []
    for r in range(repeats):
        if progress is not None:
            progress(f"measuring, repeat {r + 1} of {repeats}")
        runs.append(tuple(measure(cases, rounds, batch_s, target.op_overhead_s, quiet)))
    return CheckResult(suite, rounds, tuple(cases), tuple(predictions), tuple(runs))


# --- statistics -----------------------------------------------------------------------------------


def ranks(x: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (nan for < 2 points)."""
    if len(x) < 2:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else math.nan


def stats(cases: Sequence[Case], predicted_s: Sequence[float], measured_s: Sequence[float]
          ) -> Stats:
    """The figures of one repeat (step 3)."""
    errors = [math.log2(p / m) for p, m in zip(predicted_s, measured_s, strict=True)]
    worst = max(range(len(errors)), key=lambda i: abs(errors[i]))
    return Stats(statistics.median(abs(e) for e in errors),
                 spearman(list(measured_s), list(predicted_s)),
                 cases[worst].label, errors[worst], sum(abs(e) > 1.0 for e in errors))
