"""Cost-model fidelity on this CPU: held-out op suites, predicted vs measured, measured twice.

Run: `python benchmarks/costmodel_fidelity.py [--target FILE.toml] [--suite tuned --suite blind]
[--rounds 9] [--repeats 2] [--plot out/fidelity.png] [--markdown]`.

The check itself lives in the package (tiermap/costmodel/fidelity.py; `tiermap calibrate
--check` runs the same code), and so do the suites (tiermap/costmodel/fidelity_suites.py):

1. The target: `tiermap.costmodel.calibration.calibrate()` measures this machine, unless
   `--target` names a calibrated target file. `--save-target` writes what was measured.
2. The suites, in the order given: `tuned` (24 cases; set aside as held out, then looked at
   while the model was tuned), `blind` (20 cases, written before this session's model changes
   and run only after them), `smoke` (3), or `dev` (benchmarks/costmodel_cpu.py's suite, the one
   the model's structure was developed on).
3. For each suite, `fidelity.check`: predictions, then `--repeats` measurements (best of
   `--rounds` interleaved rounds each).
4. It prints per case predicted, measured (each repeat) and log2(predicted / measured), then per
   repeat the median |log2 error|, Spearman's rank correlation, the worst case and the cases
   off by more than 2x; and plots predicted against measured (`--plot`, one file per suite).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiermap.costmodel import fidelity  # noqa: E402
from tiermap.costmodel.fidelity_suites import SUITES, Case, suite  # noqa: E402
from tiermap.hardware.target import Target  # noqa: E402


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def table(result: fidelity.CheckResult, markdown: bool) -> str:
    head = ["op", "shape", "predicted"]
    for r in range(len(result.measured_s)):
        head += [f"measured {r + 1}", f"log2 err {r + 1}"]
    head += ["bound", "kernels"]
    body = []
    for i, (case, pred) in enumerate(zip(result.cases, result.predictions, strict=True)):
        cells = [case.op, case.shape, _fmt_s(pred.time_s)]
        for run in result.measured_s:
            cells += [_fmt_s(run[i]), f"{math.log2(pred.time_s / run[i]):+.2f}"]
        body.append([*cells, pred.bound, str(pred.kernels)])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
                     for cells in [head, *body])


def _dev_suite() -> list[Case]:
    from costmodel_cpu import suite as dev

    return [Case(c.op, c.shape, c.fn, tuple((tuple(a.shape), str(a.dtype)) for a in c.args))
            for c in dev()]


def _target(args: argparse.Namespace) -> Target:
    if args.target:
        from tiermap.hardware import load_target

        return load_target(args.target)
    from tiermap.costmodel.calibration import calibrate, target_to_toml

    target = calibrate()
    if args.save_target:
        Path(args.save_target).write_text(target_to_toml(target))
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--target", help="a calibrated target .toml (default: calibrate now)")
    parser.add_argument("--save-target", help="write the calibrated target here")
    parser.add_argument("--plot", default="out/costmodel_fidelity.png",
                        help="plot path; the suite's name is added before the suffix")
    parser.add_argument("--rounds", type=int, default=9, help="best of N rounds (default 9)")
    parser.add_argument("--repeats", type=int, default=2, help="measurement repeats (default 2)")
    parser.add_argument("--suite", action="append", choices=(*SUITES, "dev"),
                        help="suite to run (repeatable; default: tuned)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", help="also write predictions and measurements here (JSON)")
    args = parser.parse_args(argv)
    saved: dict[str, object] = {}
    load_before = os.getloadavg()[0]
    target = _target(args)
    print(f"# {datetime.datetime.now(datetime.UTC).isoformat(timespec='minutes')} "
          f"{platform.machine()}: {target.description}")
    print(f"# target {target.name}: " + ", ".join(
        f"{t.name} {t.capacity_bytes / 2**20:.3g} MiB r {t.read_bytes_per_s / 1e9:.3g} "
        f"w {t.write_bytes_per_s / 1e9:.3g} GB/s" for t in target.tiers)
        + f"; op overhead {target.op_overhead_s * 1e6:.3g} µs")
    for name in args.suite or ["tuned"]:
        cases = _dev_suite() if name == "dev" else suite(name)
        result = fidelity.check(target, cases, suite=name, rounds=args.rounds,
                                repeats=args.repeats)
        print(f"\n## suite {name}: {len(cases)} cases, best of {args.rounds} rounds, "
              f"{args.repeats} repeats; load average {load_before:.2f} before, "
              f"{os.getloadavg()[0]:.2f} now")
        print(table(result, args.markdown))
        print()
        for r, s in enumerate(result.stats):
            print(f"{name} repeat {r + 1}: median |log2 err| {s.median_abs_log2:.3f}  Spearman "
                  f"{s.spearman:.3f}  worst {s.worst} ({s.worst_log2:+.2f}, "
                  f"{2 ** abs(s.worst_log2):.2f}x)  cases off by > 2x: {s.over_2x}  "
                  f"goals {'met' if s.meets() else 'NOT met'}")
        saved[name] = {"cases": [c.label for c in result.cases],
                       "predicted_s": [p.time_s for p in result.predictions],
                       "measured_s": [list(run) for run in result.measured_s],
                       "stats": [dataclasses.asdict(s) for s in result.stats]}
        if args.plot:
            from tiermap.plots import fidelity as fidelity_plot
            from tiermap.plots import save_figure

            path = Path(args.plot)
            path = path.with_name(f"{path.stem}_{name}{path.suffix}")
            save_figure(fidelity_plot(result), path)
            print(f"plot: {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"target": target.name, "rounds": args.rounds,
                                               "suites": saved}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
