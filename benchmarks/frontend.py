"""Frontend speed and FLOP agreement: StableHLO module → tiermap IR versus jax's own lowering.

For each model of the zoo (tests/zoo.py) and the 12-layer example training step, prints one row:

- StableHLO ops: ops of the stablehlo/chlo dialects in the lowered module (regions included);
- IR ops: top-level ops of tiermap's Program (after inlining calls, folding and dead-code removal);
- tiermap: `program_from_module` on the already-lowered module, best of --repeat runs;
- jax: `jax.jit(fn).lower(*args)` with jax's caches cleared before each run, best of --repeat;
- ratio: tiermap / jax;
- FLOPs: tiermap's `flops_one_trip` / XLA's `cost_analysis()["flops"]` (custom calls as 0).

Usage: python benchmarks/frontend.py [--repeat 3] [--only NAME ...]. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import jax  # noqa: E402

from tests import zoo  # noqa: E402
from tiermap.examples import models  # noqa: E402
from tiermap.frontend.convert import program_from_module  # noqa: E402
from tiermap.frontend.mlir import stablehlo_op_count  # noqa: E402

Builder = Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]
PROGRAMS: dict[str, Builder] = {
    **{name: builder for name, builder in zoo.MODELS.items()},
    "transformer_train_12l (examples)": models.transformer_train,
}


def _best_s(fn: Callable[[], Any], repeat: int, before: Callable[[], None] | None = None
            ) -> tuple[float, Any]:
    best = float("inf")
    result = None
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _xla_flops(lowered: Any) -> float:
    flops = float(lowered.cost_analysis().get("flops", 0.0))
    return flops + len(re.findall(r" custom-call\(", lowered.as_text(dialect="hlo")))


def measure(name: str, builder: Builder, repeat: int) -> dict[str, Any]:
    fn, args = builder()
    jax_s, lowered = _best_s(lambda: jax.jit(fn).lower(*args), repeat, jax.clear_caches)
    module = lowered.compiler_ir("stablehlo")
    ours_s, program = _best_s(lambda: program_from_module(module, name=name), repeat)
    xla = _xla_flops(lowered)
    return {
        "program": name, "stablehlo_ops": stablehlo_op_count(module),
        "ir_ops": program.num_steps, "tiermap_s": ours_s, "jax_s": jax_s,
        "ratio": ours_s / jax_s, "flops": program.flops_one_trip, "xla_flops": xla,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (best is kept)")
    parser.add_argument("--only", nargs="*", default=None, help="program names to run")
    ns = parser.parse_args(argv)
    names = [n for n in PROGRAMS if ns.only is None or n in ns.only]
    print(f"jax {jax.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, best of {ns.repeat}\n")
    print("| program | StableHLO ops | IR ops | tiermap (ms) | jax lower (ms) | ratio "
          "| FLOPs tiermap / XLA |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        row = measure(name, PROGRAMS[name], ns.repeat)
        agree = row["flops"] / row["xla_flops"] if row["xla_flops"] else float("nan")
        print(f"| {row['program']} | {row['stablehlo_ops']} | {row['ir_ops']} "
              f"| {1e3 * row['tiermap_s']:.1f} | {1e3 * row['jax_s']:.1f} "
              f"| {row['ratio']:.2f} | {agree:.5f} ({row['flops']:.4g}) |", flush=True)


if __name__ == "__main__":
    main()
