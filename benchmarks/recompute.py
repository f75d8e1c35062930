"""Recomputation against offload: plans that recompute, move to host, or both. Prints markdown
tables for docs/benchmarks.md ("## Recomputation").

    python benchmarks/recompute.py            # about 4 minutes on 2 cores

1. no host tier: GPT-12 (d 768, 1024 tokens, batch 4, bf16) training step on h100-1g-nohost
   (an H100 with 1 GiB of HBM for the program and nowhere to spill): without recomputation it
   does not fit (the error's missing bytes); with it, the plan (verified), what it recomputes,
   its predicted time, the time of the same step on the full h100 (nothing recomputed), and the
   planning time.
2. starved with a host tier: the 12-layer GPT training step of `make run` on the starved a100
   (256 MiB of HBM over PCIe) and GPT-12 (d 768, bf16, batch 8) on h100-4g, each planned
   offload-only (recompute="off"), recompute-only ("fit": recompute what device memory needs,
   offload not weighed; placement may still move what is left) and "auto" (the default: the
   selection weighs recomputation against its estimate of offload; the recompute-only plan and
   the plan without recomputation are made too and the one that predicts least is kept):
   predicted time, lower bound, tensors recomputed, transfers, planning seconds, warnings,
   which plan "auto" kept.

Every plan is verified by the pipeline (the independent verifier) before it is returned.
"""

from __future__ import annotations

import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import jax  # noqa: E402

import tiermap  # noqa: E402
from tiermap.errors import InfeasiblePlacementError  # noqa: E402
from tiermap.examples import models  # noqa: E402

TARGETS = ROOT / "benchmarks" / "targets"
NOHOST = str(TARGETS / "h100-1g-nohost.toml")
A100_256M = str(TARGETS / "a100-256m.toml")
H100_4G = str(TARGETS / "h100-4g.toml")


def gpt12_bf16(batch: int = 4) -> tuple[object, tuple[object, ...]]:
    return models.transformer_train(layers=12, d_model=768, heads=12, seq=1024, batch=batch,
                                    dtype="bfloat16")


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def no_host() -> None:
    print("\n### No host tier: GPT-12 (d 768, 1024 tokens, batch 4, bf16) on h100-1g-nohost\n")
    fn, args = gpt12_bf16()
    print("| recompute | result | predicted ms | bound ms | recomputed | MiB dropped | "
          "plan s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode in ("off", "auto"):
        t0 = time.perf_counter()
        try:
            p = tiermap.plan(fn, *args, target=NOHOST, recompute=mode)
        except InfeasiblePlacementError as exc:
            text = str(exc)
            missing = text.split(": ")[1].split(" bytes missing")[0] if "missing" in text else "?"
            print(f"| {mode} | does not fit ({int(missing) / 2**30:.2f} GiB missing) | - | - | "
                  f"- | - | {time.perf_counter() - t0:.1f} |", flush=True)
            continue
        wall = time.perf_counter() - t0
        p.verify()
        dropped = sum(r.nbytes for r in p.recomputes) / 2**20
        print(f"| {mode} | verified, {p.solver.status} | {_ms(p.predicted_time_s)} | "
              f"{_ms(p.lower_bound_s)} | {len(p.recomputes)} | {dropped:.0f} | {wall:.1f} |",
              flush=True)
        kinds: dict[str, int] = {}
        for r in p.recomputes:
            found = re.search(r"op\(s\) \(([^)]*)\)", r.reason)
            key = found.group(1) if found else "?"
            kinds[key] = kinds.get(key, 0) + 1
        top = sorted(kinds.items(), key=lambda kv: -kv[1])[:4]
        print("\nwhat it recomputes (chains by their op kinds): "
              + "; ".join(f"{n} x ({k})" for k, n in top))
        for w in p.warnings:
            print(f"\nwarning: {w}")
    full = tiermap.plan(fn, *args, target="h100")
    print(f"\nthe same step on the full h100 (80 GB, nothing recomputed): "
          f"{_ms(full.predicted_time_s)} ms predicted, {len(full.recomputes)} recomputed")


def starved() -> None:
    print("\n### Starved with a host tier: offload-only, recompute-only, mixed\n")
    cases = [("gpt_train_12l (make run's)", models.transformer_train, A100_256M),
             ("gpt12_d768_bf16_b8", lambda: gpt12_bf16(batch=8), H100_4G)]
    print("| program | target | plan | predicted ms | bound ms | recomputed | transfers | "
          "plan s | warnings | auto kept |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, build, target in cases:
        fn, args = build()
        for label, mode in (("offload-only", "off"), ("recompute-only", "fit"),
                            ("auto (default)", "auto")):
            t0 = time.perf_counter()
            p = tiermap.plan(fn, *args, target=target, recompute=mode)
            wall = time.perf_counter() - t0
            kept = [n.split("the ")[1].split(" plan")[0] for n in p.notes
                    if n.startswith("recompute: the ")]
            print(f"| {name} | {p.target.name} | {label} | {_ms(p.predicted_time_s)} | "
                  f"{_ms(p.lower_bound_s)} | {len(p.recomputes)} | {len(p.transfers)} | "
                  f"{wall:.1f} | {len(p.warnings)} | {kept[0] if kept else '-'} |", flush=True)


def main() -> None:
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with "
          f"{__import__('os').cpu_count()} cores, jax {jax.__version__}")
    no_host()
    starved()


if __name__ == "__main__":
    main()
