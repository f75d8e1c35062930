"""The plan of the program that runs (tiermap/as_run.py): each program planned, traced as applied
(`tiermap.apply`, not run), and planned again without the decisions the applied program does not
realise. Prints a markdown table for docs/benchmarks.md ("## The plan of the program that runs").

    python benchmarks/as_run.py             # about 3 minutes on 2 cores
    python benchmarks/as_run.py --keras     # also keras-hub's GPT2Backbone training step (needs
                                            # keras-hub installed; KERAS_BACKEND=jax is set)

Programs:
- `p_regularised`: `models.regularised_attention_train` (512 tokens, d 64, 4 heads, width 256,
  batch 4), an attention training step whose loss also reads the probabilities (the backward
  reads P from outside the attention, as keras-hub's GPT-2 was reported to), on h100;
- `gpt12_d1024_b16` on h100-4g (benchmarks/gpu_offload.py's program): the plan moves softmax
  row sums to host that the tiled kernel never materialises;
- `gpt12_scan` on the starved a100: the scanned 12-layer step (`make run`'s model with
  `lax.scan`), whose body plans' host moves are not mapped into the loop;
- with `--keras`, `keras_gpt2`: keras-hub's GPT2Backbone (2 layers, d 128, 4 heads, 128 tokens,
  batch 4) training step on h100 (jax.grad of a stateless call), imported with TensorFlow in
  the process.

Columns: the first plan's prediction and how many of its decisions the applied program does
not realise (by kind); the rounds of planning again; the kept plan's prediction; its decisions
still not applied that its prediction counts (0 means the plan predicts what runs); warnings.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tiermap.as_run import as_run_plan  # noqa: E402
from tiermap.examples import models  # noqa: E402
from tiermap.ir.decisions import Decision, decision_counts  # noqa: E402

TARGETS = ROOT / "benchmarks" / "targets"


def keras_gpt2() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    import keras_hub

    model = keras_hub.models.GPT2Backbone(vocabulary_size=512, num_layers=2, num_heads=4,
                                          hidden_dim=128, intermediate_dim=256,
                                          max_sequence_length=128)
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def step(params: list[Any], ids: jax.Array, mask: jax.Array) -> tuple[Any, Any]:
        def loss(ps: list[Any]) -> jax.Array:
            out, _ = model.stateless_call(ps, frozen, {"token_ids": ids, "padding_mask": mask})
            return jnp.mean(out.astype(jnp.float32) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        return value, [p - 1e-3 * g for p, g in zip(params, grads, strict=True)]

    specs = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in trainable]
    return step, (specs, jax.ShapeDtypeStruct((4, 128), jnp.int32),
                  jax.ShapeDtypeStruct((4, 128), jnp.int32))


def _counts(decisions: list[Decision]) -> str:
    parts = [f"{kind} {left}" for kind, (_d, left) in decision_counts(decisions).items() if left]
    return ", ".join(parts) or "0"


def row(name: str, fn: Callable[..., Any], args: tuple[Any, ...], target: str,
        **options: Any) -> None:
    t0 = time.perf_counter()
    result = as_run_plan(fn, *args, target=target, **options)
    first, decided = result.first, list(result.first_decisions)
    wall_s = time.perf_counter() - t0
    kept = result.plan
    counted = [d for d in kept.decisions if d.priced and not d.applied]
    attention = (f"{len(first.attention)} -> {len(kept.attention)}")
    print(f"| {name} | {Path(target).stem} | {first.predicted_time_s * 1e3:.4f} | "
          f"{_counts(decided)} | {result.rounds} | {kept.predicted_time_s * 1e3:.4f} | "
          f"{attention} | {len(counted)} | {len(kept.warnings)} | {wall_s:.0f} |", flush=True)
    for w in kept.warnings:
        print(f"|  | warning | {w[:300]} |" + " |" * 7, file=sys.stderr)
    for d in kept.decisions:
        if not d.priced:
            print(f"|  | planned away: {d.kind} `{d.subject}` | {d.detail[:140]} |"
                  + " |" * 7, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keras", action="store_true", help="also keras-hub's GPT-2 step")
    ns = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, jax "
          f"{jax.__version__}\n")
    print("| program | target | first plan ms | not applied in it | rounds | kept plan ms | "
          "attention groups | not applied, counted | warnings | wall s |")
    print("|---|---|---:|---|---:|---:|---|---:|---:|---:|")
    if ns.keras:
        fn, args = keras_gpt2()
        row("keras_gpt2", fn, args, "h100", time_limit_s=10)
    fn, args = models.regularised_attention_train(n=512, d=64, heads=4, width=256, batch=4)
    row("p_regularised", fn, args, "h100", time_limit_s=10)
    fn, args = models.transformer_train(layers=12, d_model=1024, heads=16, seq=512, batch=16)
    row("gpt12_d1024_b16", fn, args, str(TARGETS / "h100-4g.toml"))
    fn, args = models.transformer_train(layers=12, scan=True)
    row("gpt12_scan", fn, args, str(TARGETS / "a100-256m.toml"))


if __name__ == "__main__":
    main()
