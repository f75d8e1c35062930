"""The plan's host offload of intermediates, executed: a GPT training step on a 4 GiB GPU target.

    python benchmarks/gpu_offload.py            # GPT-12 (several minutes and ~15 GB on 2 cores)
    python benchmarks/gpu_offload.py --quick    # the test-sized step only

Rows:
- `gpt12_d1024_b16`: the bundled GPT training step with 12 layers, d 1024, 16 heads, 512 tokens,
  batch 16, f32, SGD (`tiermap.examples.models.transformer_train`), planned with default options
  on benchmarks/targets/h100-4g.toml (an H100 with 4 GiB of HBM free): the step does not fit,
  so the plan evicts activations to host memory and prefetches them for the backward;
- `gpt1_d64_halfhbm` (also in `--quick`): tests/apply/test_offload.py's step, 1 layer, d 64,
  on h100-4g with its HBM cut to half the step's peak.

Each step is planned as `tiermap.jit` plans it (tiermap/as_run.py): traced as applied, and
planned again without the decisions the applied program does not realise ("decisions planned
away"); the columns are of the plan kept.

Columns: the plan's host-bound moves of intermediates (moves, tensors), the tensors whose moves
the applied program places, host placements (`annotate_device_placement` to pinned_host of a
computed value, program inputs left out) in `jax.export` of the applied step for CUDA, whether
the applied step run on this machine's CPU matches `jax.jit` (f32, atol 1e-4) and the largest
absolute difference over its outputs. On CPU the placements lower away, so the numbers check
the rewrite and the export checks the structure; peak memory and step time need a GPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import tiermap
from tiermap.apply import apply_plan
from tiermap.apply.offload import count_host_placements, host_moves, host_tiers
from tiermap.as_run import as_run_plan
from tiermap.examples.models import transformer_train
from tiermap.ir.plan import occupancy_bytes
from tiermap.sweep import with_capacity

ROOT = Path(__file__).resolve().parents[1]
H100_4G = str(ROOT / "benchmarks" / "targets" / "h100-4g.toml")
ATOL = 1e-4


def _real(args: tuple[Any, ...], vocab: int, seed: int = 0) -> tuple[Any, ...]:
    leaves, tree = jax.tree.flatten(args)
    key = jax.random.key(seed)
    vals = []
    for i, s in enumerate(leaves):
        k = jax.random.fold_in(key, i)
        if jnp.issubdtype(s.dtype, jnp.integer):
            vals.append(jax.random.randint(k, s.shape, 0, vocab, s.dtype))
        else:
            vals.append((0.02 * jax.random.normal(k, s.shape)).astype(s.dtype))
    return jax.tree.unflatten(tree, vals)


def _halved(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    target = tiermap.target(H100_4G)
    peak = max(occupancy_bytes(tiermap.plan(fn, *args, target=target,
                                            strategy="greedy"))["hbm"])
    return with_capacity(target, "hbm", peak // 2)


def row(name: str, kw: dict[str, Any], halve: bool, run: bool = True) -> None:
    fn, args = transformer_train(**kw)
    target = _halved(fn, args) if halve else tiermap.target(H100_4G)
    t0 = time.perf_counter()
    result = as_run_plan(fn, *args, target=target)  # the plan tiermap.jit keeps
    plan = result.plan
    plan_s = time.perf_counter() - t0
    inputs = set(plan.program.inputs) if plan.program is not None else set()
    host = host_tiers(plan)
    moves = {tid: sum(1 for m in ms if m.dst in host)
             for tid, ms in host_moves(plan).items() if tid not in inputs}
    away = [d for d in plan.decisions if not d.priced]
    applied = apply_plan(fn, result.source, planned_only=True)
    vals = _real(args, kw.get("vocab", 1024))
    t0 = time.perf_counter()
    text = jax.export.export(jax.jit(applied), platforms=["cuda"])(*vals).mlir_module()
    export_s = time.perf_counter() - t0
    placements = count_host_placements(text, intermediates_only=True)
    done = {d.subject for d in applied.decisions if d.kind == "offload" and d.applied}
    not_done = [d for d in applied.decisions
                if d.kind == "offload" and not d.applied and d.subject in moves]
    err, run_s = float("nan"), float("nan")
    if run:
        t0 = time.perf_counter()
        out = jax.block_until_ready(applied(*vals))
        run_s = time.perf_counter() - t0
        ref = jax.block_until_ready(jax.jit(fn)(*vals))
        err = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(r, np.float64))))
                  for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True))
        del out, ref
    print(f"| {name} | {target.name} | {plan.num_steps} | {sum(moves.values())} | {len(moves)} "
          f"| {len(done & set(moves))} | {placements} | {len(away)} | "
          f"{('yes' if err <= ATOL else 'NO') if run else 'not run'} "
          f"| {err:.2e} | {plan_s:.0f} | {export_s:.0f} | {run_s:.0f} |", flush=True)
    for d in away:
        print(f"    planned away: {d.kind} {d.subject}: {d.detail}")
    for w in plan.warnings:
        print(f"    warning: {w}")
    for d in not_done:
        print(f"    not applied: {d.subject}: {d.detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the test-sized step only")
    parser.add_argument("--export-only", action="store_true",
                        help="GPT-12: plan and export, not run on the CPU (that takes ~23 GB)")
    ns = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}\n")
    print("| program | target | ops | host moves (intermediates) | tensors | tensors placed "
          "| host placements in CUDA export | decisions planned away | matches jax.jit "
          "| max abs error | plan s | export s | applied run s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    row("gpt1_d64_halfhbm", {"layers": 1, "d_model": 64, "heads": 2, "seq": 64, "batch": 4,
                             "vocab": 128}, halve=True)
    if not ns.quick:
        row("gpt12_d1024_b16", {"layers": 12, "d_model": 1024, "heads": 16, "seq": 512,
                                "batch": 16}, halve=False, run=not ns.export_only)


if __name__ == "__main__":
    main()
