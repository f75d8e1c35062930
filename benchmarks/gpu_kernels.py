"""GPU kernel check: predicted (a GPU target, default h100) against measured kernel times.

Run on a machine with an NVIDIA GPU and jax[cuda]: `python benchmarks/gpu_kernels.py
[--target h100] [--rounds 20] [--markdown]`. Without a GPU: `--dry-run` prints the predictions
only (the test suite runs it that way).

1. The kernels: bf16 matmuls (square 4096 and 8192, an MLP-shaped 8192x4096x16384 and a
   skinny 16x8192x8192), elementwise ops (add of 2^28 bf16 elements, GELU with tanh of 2^26 f32,
   exp of 2^26 f32), reductions (row sums of f32[16384, 16384], a full sum of 2^28 f32) and
   attention (bf16 [batch, heads, length, 64] as two einsums and a softmax, XLA's own fusion;
   and `jax.nn.dot_product_attention`, which XLA may run as cuDNN's fused flash attention).
2. Prediction: each kernel lowered for the target's platform ("cuda") by tiermap's frontend and
   costed by `tiermap.costmodel.fidelity.predict` (XLA-like kernels, every tensor in HBM, the
   plain roofline of the target file: peak FLOP/s of the dtype, HBM bandwidth, op overhead).
   The attention kernels are also given the model's fused (FlashAttention) figure: the plan
   tiermap makes for them with `tiermap.plan` (fused groups, tiled).
3. Measurement: `jax.jit` compiled once; best per-call time over `--rounds` rounds of
   back-to-back calls ending in `block_until_ready`; less the per-call time of a trivial
   one-element program (dispatch and one launch), plus the target's `op_overhead_s`.
4. It prints per kernel predicted, measured and log2(predicted / measured), then the median
   |log2 err|, Spearman's rank correlation and the worst kernel.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from tiermap.costmodel import fidelity
from tiermap.frontend.lowering import lower
from tiermap.hardware import load_target
from tiermap.hardware.target import Target

BF16, F32 = jnp.bfloat16, jnp.float32


@dataclass(frozen=True)
class Kernel:
    """One GPU kernel of the check."""

    kind: str  # matmul | elementwise | reduction | attention
    name: str
    fn: Callable[..., Any]
    args: tuple[jax.ShapeDtypeStruct, ...]


def _s(*shape: int, dtype: Any = BF16) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _attention(q: Any, k: Any, v: Any) -> Any:
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (1.0 / math.sqrt(q.shape[-1]))
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def _sdpa(q: Any, k: Any, v: Any) -> Any:
    # dot_product_attention takes [batch, length, heads, dim]
    return jax.nn.dot_product_attention(q, k, v)


def kernels(small: bool = False) -> list[Kernel]:
    """The check's kernels; `small` divides every size (a quick dry run in tests)."""
    d = 8 if small else 1
    out = [
        Kernel("matmul", f"bf16 {4096 // d}^3", lambda a, b: a @ b,
               (_s(4096 // d, 4096 // d), _s(4096 // d, 4096 // d))),
        Kernel("matmul", f"bf16 {8192 // d}^3", lambda a, b: a @ b,
               (_s(8192 // d, 8192 // d), _s(8192 // d, 8192 // d))),
        Kernel("matmul", f"bf16 {8192 // d}x{4096 // d}x{16384 // d}", lambda a, b: a @ b,
               (_s(8192 // d, 4096 // d), _s(4096 // d, 16384 // d))),
        Kernel("matmul", f"bf16 16x{8192 // d}x{8192 // d}", lambda a, b: a @ b,
               (_s(16, 8192 // d), _s(8192 // d, 8192 // d))),
        Kernel("elementwise", f"add bf16 2^{28 - 3 * (d > 1)}", lambda a, b: a + b,
               (_s(2**28 // d),) * 2),
        Kernel("elementwise", f"gelu tanh f32 2^{26 - 3 * (d > 1)}",
               lambda x: jax.nn.gelu(x, approximate=True), (_s(2**26 // d, dtype=F32),)),
        Kernel("elementwise", f"exp f32 2^{26 - 3 * (d > 1)}", jnp.exp,
               (_s(2**26 // d, dtype=F32),)),
        Kernel("reduction", f"sum rows f32 {16384 // d}^2", lambda x: jnp.sum(x, axis=1),
               (_s(16384 // d, 16384 // d, dtype=F32),)),
        Kernel("reduction", f"sum all f32 2^{28 - 3 * (d > 1)}", jnp.sum,
               (_s(2**28 // d, dtype=F32),)),
        Kernel("attention", f"einsum bf16 4x16x{4096 // d}x64", _attention,
               (_s(4, 16, 4096 // d, 64),) * 3),
        Kernel("attention", f"dot_product_attention bf16 4x{4096 // d}x16x64", _sdpa,
               (_s(4, 4096 // d, 16, 64),) * 3),
    ]
    return out


@dataclass(frozen=True)
class Row:
    kernel: Kernel
    predicted_s: float
    planned_s: float | None  # tiermap's plan (fused, tiled), attention only
    measured_s: float | None


def predict(kernel: Kernel, target: Target) -> tuple[float, float | None]:
    """(the XLA-like kernels' roofline time, the time of tiermap's plan for attention)."""
    program = lower(kernel.fn, *kernel.args, platform=target.platform)
    predicted = fidelity.predict(program, target).time_s
    planned = None
    if kernel.kind == "attention":
        import tiermap

        planned = tiermap.plan(program, target=target, strategy="greedy").predicted_time_s
    return predicted, planned


def measure(kernels_: Sequence[Kernel], rounds: int, overhead_s: float) -> list[float]:
    """Net seconds per kernel on the default (GPU) device (module docstring, step 3)."""
    from tiermap.costmodel.calibration_sweeps import best_call_s, trivial_kernel

    compiled: list[tuple[Any, Sequence[Any]]] = []
    key = jax.random.PRNGKey(0)
    for i, k in enumerate(kernels_):
        fn = jax.jit(k.fn).lower(*k.args).compile()
        args = [jax.random.normal(jax.random.fold_in(key, 10 * i + j), a.shape, a.dtype)
                for j, a in enumerate(k.args)]
        compiled.append((fn, args))
    best = best_call_s([trivial_kernel(), *compiled], rounds, 0.05, quiet=False)
    return [max(b - best[0] + overhead_s, 1e-9) for b in best[1:]]


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def table(rows: Sequence[Row], markdown: bool) -> str:
    head = ["kind", "kernel", "predicted", "planned (fused)", "measured", "log2 err"]
    body = [[r.kernel.kind, r.kernel.name, _fmt(r.predicted_s), _fmt(r.planned_s),
             _fmt(r.measured_s),
             f"{math.log2(r.predicted_s / r.measured_s):+.2f}" if r.measured_s else "-"]
            for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
                     for cells in [head, *body])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--target", default="h100", help="a GPU target (default h100)")
    parser.add_argument("--rounds", type=int, default=20, help="best of N rounds (default 20)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the predictions only (no GPU needed)")
    parser.add_argument("--small", action="store_true", help="sizes / 8 (quick dry runs)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    target = load_target(args.target)
    ks = kernels(args.small)
    predictions = [predict(k, target) for k in ks]
    measured: list[float | None] = [None] * len(ks)
    if not args.dry_run:
        devices = jax.devices()
        if devices[0].platform != "gpu":
            print(f"no GPU: jax's default device is {devices[0]}; use --dry-run",
                  file=sys.stderr)
            return 2
        print(f"# device: {devices[0].device_kind}; jax {jax.__version__}")
        measured = list(measure(ks, args.rounds, target.op_overhead_s))
    how = "dry run: predictions only" if args.dry_run else f"best of {args.rounds} rounds"
    print(f"# target {target.name}: {target.description}; {how}")
    rows = [Row(k, p, planned, m)
            for k, (p, planned), m in zip(ks, predictions, measured, strict=True)]
    print(table(rows, args.markdown))
    if not args.dry_run:
        done = [r for r in rows if r.measured_s]
        errors = [math.log2(r.predicted_s / (r.measured_s or 1.0)) for r in done]
        worst = max(range(len(errors)), key=lambda i: abs(errors[i]))
        rho = fidelity.spearman([r.measured_s or 0.0 for r in done],
                                [r.predicted_s for r in done])
        print(f"\nmedian |log2 err| {statistics.median(abs(e) for e in errors):.3f}  "
              f"Spearman {rho:.3f}  worst {done[worst].kernel.name} ({errors[worst]:+.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
