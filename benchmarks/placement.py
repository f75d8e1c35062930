"""Placement quality and planning speed: naive, greedy and mip on real models and targets.

    python benchmarks/placement.py                  # everything (about 20 minutes on 2 cores)
    python benchmarks/placement.py --quick          # fewer models, shorter limits
    python benchmarks/placement.py --only quality   # or: speed, big

Prints markdown tables for docs/benchmarks.md ("## Placement"):

1. quality: for each model and target, the predicted time of the naive, greedy and mip plans,
   the program's lower bound (the per-step knapsack, or the capacity LP where a tier binds and
   it is higher), mip/bound − 1, greedy/mip, the solver's status and the placement wall time
   (the capacity LP's included). A row is "starved" when the live tensors at some step exceed
   the main-memory tier (so activations must go to a slower tier).
2. speed: the whole pipeline (lowering included) on the 12-layer transformer training step against
   XLA's own CPU compile of the same function (`jax.jit(fn).lower(*args).compile()`).
3. big: a ~20k-op program (the training step with more layers) planned within its time limit.

Goals checked at the end: mip never worse than greedy; on starved rows mip ≥ 1.05× better than
greedy (geometric mean); mip within 20% of the lower bound on rows that are not starved.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tiermap  # noqa: E402
from tiermap.frontend.lowering import lower  # noqa: E402
from tiermap.ir.plan import Plan  # noqa: E402
from tiermap.ir.program import Program  # noqa: E402
from tiermap.pipeline import build_passes, plan  # noqa: E402
from tiermap.placement.place_tiers import PlaceTiersPass  # noqa: E402

STARVED_TARGET = str(ROOT / "benchmarks" / "targets" / "a100-256m.toml")
TARGETS = ("sn40l", "h100", "a100", "tpu-v5e", STARVED_TARGET)


def _models(quick: bool) -> dict[str, Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]]:
    from tiermap.examples import models

    out: dict[str, Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]] = {
        "transformer_train_12l": models.transformer_train,
        "transformer_forward_12l": models.transformer_forward,
        "mlp": models.mlp,
        "attention": models.attention,
    }
    if not quick:
        from tests import zoo

        out["resnet50_forward"] = zoo.haiku_resnet50_forward
        out["resnet50_train"] = zoo.haiku_resnet50_train
    return out


def _starved_models(quick: bool) -> dict[str, Callable[[], tuple[Callable[..., Any],
                                                                  tuple[Any, ...]]]]:
    """Larger batches, run on the memory-starved target only (more starved rows)."""
    from tiermap.examples import models

    out: dict[str, Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]] = {
        "transformer_train_6l_b16": lambda: models.transformer_train(layers=6, batch=16),
        "mlp_b4096": lambda: models.mlp(batch=4096, sizes=(2048, 4096, 4096, 4096, 10)),
    }
    if not quick:
        from tests import zoo

        out["resnet50_train_b16_128px"] = lambda: zoo.haiku_resnet50_train(batch=16,
                                                                          image_px=128)
    return out


@dataclass
class Row:
    model: str
    target: str
    ops: int
    starved: bool
    plan: Plan
    wall_s: float
    program: Program

    @property
    def mip_s(self) -> float:
        return self.plan.predicted_time_s

    @property
    def greedy_s(self) -> float:
        return self.plan.baselines["greedy"]


def _starved(p: Plan) -> bool:
    """Whether the tensors the plan keeps in memory (fused intermediates never reach it) exceed
    the main-memory tier at some step, so that some must live in a slower tier."""
    diff = np.zeros(p.num_steps + 1, dtype=np.int64)
    for t in p.tensors:
        if t.materialized:
            diff[max(t.producer_step, 0)] += t.nbytes
            diff[t.last_use_step + 1] -= t.nbytes
    peak = int(np.cumsum(diff[:p.num_steps]).max(initial=0))
    return peak > p.target.main_tier.capacity_bytes


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{1e3 * x:.4g}"


def quality(quick: bool, time_limit_s: float, starved_only: bool = False) -> list[Row]:
    rows: list[Row] = []
    print("\n### Plan quality\n")
    print(f"time limit {time_limit_s:g} s per MIP (HiGHS, seed 0); times in ms\n")
    print("| model | target | ops | starved | naive | greedy | mip | bound | mip/bound−1 | "
          "greedy/mip | status (gap) | place-tiers s |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
    grid = () if starved_only else TARGETS
    cases = [(name, build, grid or (STARVED_TARGET,)) for name, build in _models(quick).items()
             if not starved_only or "train" in name] + [
        (name, build, (STARVED_TARGET,)) for name, build in _starved_models(quick).items()]
    for name, build, target_names in cases:
        fn, args = build()
        for target_name in target_names:
            target = tiermap.target(target_name)
            program = lower(fn, *args, platform=target.platform)
            t0 = time.perf_counter()
            # the capacity LP bound on; the deadline has room for it (up to 60 s) and the
            # fusion passes, so the placement MIP keeps its whole limit
            passes = [replace(q, capacity_bound=True) if isinstance(q, PlaceTiersPass) else q
                      for q in build_passes("mip", time_limit_s)]
            p = plan(program, target=target, passes=passes, time_limit_s=time_limit_s + 180.0)
            row = Row(name, target.name, program.num_steps, _starved(p), p,
                      time.perf_counter() - t0, program)
            rows.append(row)
            gap = "" if p.solver.gap is None else f" ({100 * p.solver.gap:.2g}%)"
            print(f"| {name} | {target.name} | {row.ops} | {'yes' if row.starved else 'no'} | "
                  f"{_ms(p.baselines.get('naive'))} | {_ms(row.greedy_s)} | {_ms(row.mip_s)} | "
                  f"{_ms(p.lower_bound_s)} | {row.mip_s / p.lower_bound_s - 1:.3f} | "
                  f"{row.greedy_s / row.mip_s:.3f} | {p.solver.status}{gap} | "
                  f"{p.pass_wall_s.get('place-tiers', 0.0):.1f} |", flush=True)
    respread_table(rows, time_limit_s)
    return rows


def _greedy_respread_s(row: Row, time_limit_s: float) -> float:
    """Predicted time of greedy's placement after the MIP strategy's post-pass (each transfer
    re-spread within its gap, `respread_moves`), under the same fusion passes."""
    from tiermap.ir.fusion import Fusion
    from tiermap.passes.base import PipelineState
    from tiermap.passes.manager import PassManager
    from tiermap.placement.baselines import greedy_assignment
    from tiermap.placement.problem import PlacementProblem

    target = row.plan.target
    passes = build_passes("mip", time_limit_s)
    before = passes[:next(i for i, q in enumerate(passes) if isinstance(q, PlaceTiersPass))]
    state = PassManager(before).run(PipelineState(row.program, target, Fusion(), "time"))
    problem = PlacementProblem(state.program, target, state.fusion, state.liveness, "time",
                               pin=True)
    return problem.respread_parts(greedy_assignment(problem))[2]


def respread_table(rows: list[Row], time_limit_s: float) -> None:
    """How much of mip's lead over greedy on the starved rows is the MIP's own and how much is
    the re-spreading post-pass, which greedy's placement could take too."""
    starved = [r for r in rows if r.starved]
    if not starved:
        return
    print("\nStarved rows: greedy's placement after the MIP strategy's re-spreading post-pass "
          "(times in ms)\n")
    print("| model | greedy | greedy re-spread | mip | greedy re-spread / mip |")
    print("|---|---:|---:|---:|---:|")
    for r in starved:
        spread_s = _greedy_respread_s(r, time_limit_s)
        print(f"| {r.model} | {_ms(r.greedy_s)} | {_ms(spread_s)} | {_ms(r.mip_s)} | "
              f"{spread_s / r.mip_s:.3f} |", flush=True)


def goals(rows: list[Row]) -> None:
    print("\n### Goals\n")
    worse = [r for r in rows if r.mip_s > r.greedy_s * (1 + 1e-9)]
    print(f"- mip never worse than greedy: {'met' if not worse else 'MISSED'} "
          f"({len(rows) - len(worse)}/{len(rows)} rows)")
    starved = [r for r in rows if r.starved]
    if starved:
        geo = math.exp(sum(math.log(r.greedy_s / r.mip_s) for r in starved) / len(starved))
        print(f"- starved rows, greedy/mip geometric mean ≥ 1.05: "
              f"{'met' if geo >= 1.05 else 'MISSED'} ({geo:.3f} over {len(starved)} rows: "
              + ", ".join(f"{r.model}@{r.target} {r.greedy_s / r.mip_s:.3f}" for r in starved)
              + ")")
    fed = [r for r in rows if not r.starved]
    if fed:
        far = [r for r in fed if r.mip_s > 1.2 * r.plan.lower_bound_s]
        print(f"- rows not starved, mip within 20% of the bound: "
              f"{'met' if not far else 'MISSED'} ({len(fed) - len(far)}/{len(fed)} rows"
              + ("; over: " + ", ".join(f"{r.model}@{r.target} "
                                         f"+{100 * (r.mip_s / r.plan.lower_bound_s - 1):.0f}%"
                                         for r in far) if far else "") + ")")


def speed(time_limit_s: float, repeat: int) -> None:
    from tiermap.examples.models import transformer_train

    print("\n### Planning speed: 12-layer transformer training step\n")
    fn, args = transformer_train()
    xla_s = []
    for _ in range(repeat):
        jax.clear_caches()
        t0 = time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        xla_s.append(time.perf_counter() - t0)
    print(f"XLA CPU compile (`jax.jit(fn).lower(*args).compile()`, caches cleared), best of "
          f"{repeat}: {min(xla_s):.2f} s\n")
    print("| target | time limit s | pipeline s | of which place-tiers s | fuse s | ops | "
          "status | predicted ms (greedy) | pipeline / XLA |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    short_s = min(4.0, time_limit_s)
    for target_name, limit_s in (("h100", time_limit_s), ("sn40l", time_limit_s),
                                 (STARVED_TARGET, time_limit_s), (STARVED_TARGET, short_s)):
        target = tiermap.target(target_name)
        best: tuple[float, Plan] | None = None
        for _ in range(repeat):
            jax.clear_caches()
            t0 = time.perf_counter()
            p = plan(fn, *args, target=target, time_limit_s=limit_s)
            wall_s = time.perf_counter() - t0
            if best is None or wall_s < best[0]:
                best = (wall_s, p)
        assert best is not None
        wall_s, p = best
        print(f"| {target.name} | {limit_s:g} | {wall_s:.2f} | "
              f"{p.pass_wall_s.get('place-tiers', 0):.2f} | {p.pass_wall_s.get('fuse', 0):.2f} | "
              f"{p.num_steps} | {p.solver.status} | {_ms(p.predicted_time_s)} "
              f"({_ms(p.baselines['greedy'])}) | {wall_s / min(xla_s):.2f} |", flush=True)


def big(layers: int, time_limit_s: float) -> None:
    from tiermap.examples.models import transformer_train

    print(f"\n### A long program: the training step with {layers} layers\n")
    fn, args = transformer_train(layers=layers)
    target = tiermap.target(STARVED_TARGET)
    t0 = time.perf_counter()
    program = lower(fn, *args, platform=target.platform)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = plan(program, target=target, time_limit_s=time_limit_s)
    plan_s = time.perf_counter() - t0
    passes = ", ".join(f"{k} {v:.1f} s" for k, v in p.pass_wall_s.items())
    print(f"- {program.num_steps} ops, {len(program.values)} tensors on {target.name}; "
          f"lowering {lower_s:.1f} s; planning {plan_s:.1f} s ({passes})")
    given = "–" if p.solver.time_limit_s is None else f"{p.solver.time_limit_s:.1f}"
    print(f"- planning time limit (deadline after lowering) {time_limit_s:g} s, of which the "
          f"MIP was given {given} s; solver {p.solver.status}, wall {p.solver.wall_s:.1f} s; "
          f"{p.solver.detail}")
    print(f"- within the limit: {'yes' if plan_s <= time_limit_s else 'NO'} "
          f"({plan_s:.1f} s for {time_limit_s:g} s)")
    print(f"- predicted {_ms(p.predicted_time_s)} ms; greedy {_ms(p.baselines['greedy'])} ms; "
          f"naive {_ms(p.baselines.get('naive'))} ms; bound {_ms(p.lower_bound_s)} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer models, shorter limits")
    parser.add_argument("--only", choices=("quality", "speed", "big"), default=None)
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="MIP time limit per plan (default 20, quick 5)")
    parser.add_argument("--big-layers", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--starved-only", action="store_true",
                        help="quality: only the training steps on the memory-starved target")
    opts = parser.parse_args()
    limit_s = opts.time_limit_s or (5.0 if opts.quick else 20.0)
    print(f"jax {jax.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"{platform.system()}")
    if opts.only in (None, "quality"):
        goals(quality(opts.quick, limit_s, opts.starved_only))
    if opts.only in (None, "speed"):
        speed(limit_s, opts.repeat)
    if opts.only in (None, "big"):
        big(opts.big_layers if not opts.quick else 24, 2 * limit_s)


if __name__ == "__main__":
    main()
