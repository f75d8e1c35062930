"""The planner: deterministic on any machine, what its MIP earns where memory is short, and its
speed against XLA's compile. Prints markdown tables for docs/benchmarks.md ("## The planner").

    python benchmarks/planner.py                       # all three (about 15 minutes on 2 cores)
    python benchmarks/planner.py --only determinism    # or: starved, speed

1. determinism: each program planned twice with the default options (`tiermap.plan(fn, *args,
   target=...)`), once on a quiet machine and once beside two busy processes (Python loops
   spinning on both cores); the plan JSON compared apart from its "wall" keys, and any
   warnings (a solver's wall-clock guard that fired) listed.
2. starved: programs whose live tensors exceed the target's main memory. For each: greedy's
   placement as it is and after the re-spreading post-pass, the MIP's placement before and after
   the post-pass, the plan `tiermap.plan` returns, and the lower bounds (the per-step knapsack
   and the capacity LP); greedy/mip and mip/bound.
3. speed: the 12-layer GPT training step: `tiermap.plan` with default options (lowering
   included) against XLA's CPU compile of the same function, measured alternately, best of 2.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import jax  # noqa: E402

import tiermap  # noqa: E402
from tests.passes.helpers import busy, strip_wall  # noqa: E402
from tiermap.bounds.capacity_lp import capacity_lower_bound  # noqa: E402
from tiermap.costmodel.evaluate import evaluate  # noqa: E402
from tiermap.frontend.lowering import lower  # noqa: E402
from tiermap.ir.fusion import Fusion  # noqa: E402
from tiermap.passes.base import PipelineState  # noqa: E402
from tiermap.passes.manager import PassManager  # noqa: E402
from tiermap.pipeline import build_passes  # noqa: E402
from tiermap.placement.baselines import greedy_assignment  # noqa: E402
from tiermap.placement.mip import solve_mip  # noqa: E402
from tiermap.placement.mip_model import default_workers  # noqa: E402
from tiermap.placement.place_tiers import PlaceTiersPass  # noqa: E402
from tiermap.placement.problem import PlacementProblem  # noqa: E402

TARGETS = ROOT / "benchmarks" / "targets"
A100_256M = str(TARGETS / "a100-256m.toml")
H100_4G = str(TARGETS / "h100-4g.toml")
Build = Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]


def _determinism_cases() -> list[tuple[str, Build, str]]:
    from tests import zoo
    from tiermap.examples import models

    return [
        ("gpt_train_12l", models.transformer_train, "sn40l"),
        ("gpt_train_12l", models.transformer_train, A100_256M),
        ("gpt_forward_12l", models.transformer_forward, "h100"),
        ("mlp", models.mlp, "tpu-v5e"),
        ("attention", models.attention, "a100"),
        ("flax_gpt_block", lambda: zoo.flax_transformer_forward(layers=1, d_model=256, seq=256),
         "sn40l"),
        ("flax_gpt_train_4l", lambda: zoo.flax_transformer_train(layers=4, d_model=256, seq=256,
                                                                 batch=8), H100_4G),
        ("resnet50_train_b8", lambda: zoo.haiku_resnet50_train(batch=8, image_px=128), H100_4G),
    ]


def _starved_cases() -> list[tuple[str, Build, str]]:
    from tests import zoo
    from tiermap.examples import models

    return [
        ("gpt_train_12l", models.transformer_train, A100_256M),
        ("gpt_train_6l_b16", lambda: models.transformer_train(layers=6, batch=16), A100_256M),
        ("gpt_train_12l_d1024_b16", lambda: models.transformer_train(
            layers=12, d_model=1024, heads=16, seq=512, batch=16), H100_4G),
        ("flax_gpt_train_8l_b32", lambda: zoo.flax_transformer_train(
            layers=8, d_model=1024, heads=16, seq=512, batch=32, vocab=8192), H100_4G),
        ("resnet50_train_b128_224px", lambda: zoo.haiku_resnet50_train(batch=128, image_px=224,
                                                                       classes=1000), H100_4G),
    ]


def _name(target: str) -> str:
    return Path(target).stem if target.endswith(".toml") else target


def determinism() -> bool:
    print("\n### Determinism\n")
    print("Default options; the second plan made beside two busy processes.\n")
    print("| program | target | ops | plan s (quiet) | plan s (busy) | identical | warnings |")
    print("|---|---|---:|---:|---:|---|---|")
    all_same = True
    for name, build, target in _determinism_cases():
        fn, args = build()
        texts, walls = [], []
        for loaded in (False, True):
            t0 = time.perf_counter()
            if loaded:
                with busy(2):
                    p = tiermap.plan(fn, *args, target=target)
            else:
                p = tiermap.plan(fn, *args, target=target)
            walls.append(time.perf_counter() - t0)
            texts.append(p.to_json())
        same = strip_wall(texts[0]) == strip_wall(texts[1])
        all_same = all_same and same
        warned = sorted({w.split(":")[0] for t in texts for w in json.loads(t)["warnings"]})
        print(f"| {name} | {_name(target)} | {p.num_steps} | {walls[0]:.1f} | {walls[1]:.1f} | "
              f"{'yes' if same else 'NO'} | {', '.join(warned) or 'none'} |", flush=True)
    print(f"\nByte-identical plans (wall keys aside): {'all' if all_same else 'NOT all'}")
    return all_same


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{1e3 * x:.4g}"


def _predicted_s(problem: PlacementProblem, state: PipelineState, assignment: Any,
                 respread: bool) -> float:
    res, xfers = problem.to_plan_parts(assignment, respread=respread)
    return evaluate(state.program, state.target, res, xfers, state.fusion).predicted_time_s


def starved() -> bool:
    print("\n### Where memory is short\n")
    print("Predicted step times in ms. greedy / greedy+rs: greedy's placement before / after the "
          "re-spreading post-pass; mip / mip+rs: the MIP's placement (warm-started from greedy) "
          "before / after it; plan: what `tiermap.plan` returns (default options); bound: the "
          "larger of the knapsack and capacity-LP bounds.\n")
    print("| program | target | ops | greedy | greedy+rs | mip | mip+rs | plan | bound | "
          "greedy/plan | greedy+rs/mip+rs | plan/bound |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios, gaps = [], []
    for name, build, target_name in _starved_cases():
        fn, args = build()
        target = tiermap.target(target_name)
        final = tiermap.plan(fn, *args, target=target)
        program = lower(fn, *args, platform=target.platform)
        passes = build_passes("mip")
        before = passes[:next(i for i, q in enumerate(passes) if isinstance(q, PlaceTiersPass))]
        state = PassManager(before).run(PipelineState(program, target, Fusion(), "time"))
        fusion = state.fusion
        problem = PlacementProblem(state.program, target, fusion, state.liveness, "time",
                                   pin=True)
        greedy = greedy_assignment(problem)
        greedy_s = _predicted_s(problem, state, greedy, False)
        greedy_rs = _predicted_s(problem, state, greedy, True)
        out = solve_mip(problem, greedy, 600.0, 0, "highs", default_workers())
        mip_raw = out.assignment or greedy
        mip_s = _predicted_s(problem, state, mip_raw, False)
        mip_rs = _predicted_s(problem, state, mip_raw, True)
        cap = capacity_lower_bound(state.program, target, fusion, time_limit_s=300.0)
        bound_s = max(final.lower_bound_s, cap.bound_s or 0.0)
        ratios.append(final.baselines["greedy"] / final.predicted_time_s)
        gaps.append(final.predicted_time_s / bound_s)
        print(f"| {name} | {target.name} | {program.num_steps} | {_ms(greedy_s)} | "
              f"{_ms(greedy_rs)} | {_ms(mip_s)} | {_ms(mip_rs)} | {_ms(final.predicted_time_s)} | "
              f"{_ms(bound_s)} | {ratios[-1]:.3f} | {greedy_rs / mip_rs:.3f} | {gaps[-1]:.3f} |",
              flush=True)
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    met_geo, met_gap = geo >= 1.25, max(gaps) <= 1.10
    print(f"\n- geomean greedy/plan ≥ 1.25: {'met' if met_geo else 'NOT met'} ({geo:.3f})")
    print(f"- every plan within 1.10x of its bound: {'met' if met_gap else 'NOT met'} "
          f"(worst {max(gaps):.3f})")
    return met_geo and met_gap


def speed() -> bool:
    from tiermap.examples import models

    print("\n### Planning speed\n")
    fn, args = models.transformer_train()
    plan_s, xla_s = math.inf, math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        xla_s = min(xla_s, time.perf_counter() - t0)
        jax.clear_caches()
        t0 = time.perf_counter()
        p = tiermap.plan(fn, *args, target="sn40l")
        plan_s = min(plan_s, time.perf_counter() - t0)
    print("| program | XLA CPU compile s | tiermap.plan s (sn40l, default options) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| gpt_train_12l | {xla_s:.2f} | {plan_s:.2f} | {plan_s / xla_s:.2f} |")
    print("\npasses (last run): " + ", ".join(f"{k} {v:.2f} s" for k, v in p.pass_wall_s.items()))
    return plan_s <= xla_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("determinism", "starved", "speed"))
    ns = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {__import__('os').cpu_count()} "
          f"cores, jax {jax.__version__}")
    ok = True
    for name, section in (("determinism", determinism), ("starved", starved),
                          ("speed", speed)):
        if ns.only in (None, name):
            ok = section() and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
