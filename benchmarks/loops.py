"""Loops planned as steady states against their unrolled twins, measured side by side in one run.

    python benchmarks/loops.py            # the full table (a few minutes on 2 cores)
    python benchmarks/loops.py --quick    # fewer layers, one target

Rows:
- `gpt-train`: the bundled GPT training step (make run's example: d 256, 256 tokens, batch 8,
  f32, SGD), its blocks written once as a Python loop and once as `lax.scan` over stacked block
  weights;
- `flax-nnscan`: a flax linen decoder of this file (pre-LayerNorm, causal
  `MultiHeadDotProductAttention`, GELU MLP), once with `nn.scan` over the blocks and once with a
  Python loop, its training step (`jax.grad`, SGD);

each planned with default options on sn40l, h100 and the starved a100 (benchmarks/targets/
a100-256m.toml). Columns: predicted time of each plan and their ratio (goal: scan ≤ 1.05×
unrolled), planning wall time of each (best of REPEAT runs) and their ratio (goal: ≤ 0.3).

Then a 96-layer scanned GPT training step: tiermap's planning time against XLA's CPU compile of
the same function (`jax.jit(f).lower(*args).compile()`, jax's caches cleared first), measured
one after the other in this process, each the best of REPEAT runs (goal: ≤ 1.0×).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import tiermap
from tiermap.examples.models import transformer_train

ROOT = Path(__file__).resolve().parents[1]
STARVED_TARGET = str(ROOT / "benchmarks" / "targets" / "a100-256m.toml")
TARGETS = ("sn40l", "h100", STARVED_TARGET)


class Block(nn.Module):
    """One pre-LayerNorm decoder block."""

    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, use_bias=False)(
            h, h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.gelu(nn.Dense(4 * self.d_model, use_bias=False)(h))
        return x + nn.Dense(self.d_model, use_bias=False)(h)


class ScanBlock(nn.Module):
    """`Block` in the (carry, x) -> (carry, y) form `nn.scan` takes."""

    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return Block(self.d_model, self.heads)(x), None


class Decoder(nn.Module):
    """Token embedding, `layers` blocks (scanned or a Python loop), tied output head."""

    layers: int
    d_model: int = 256
    heads: int = 4
    vocab: int = 1024
    scan: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        emb = nn.Embed(self.vocab, self.d_model)
        x = emb(tokens)
        if self.scan:
            stack = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=self.layers)(self.d_model, self.heads)
            x, _ = stack(x, None)
        else:
            for _ in range(self.layers):
                x = Block(self.d_model, self.heads)(x)
        return emb.attend(nn.LayerNorm()(x))


def flax_train(layers: int, scan: bool, seq: int = 256, batch: int = 8
               ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """(fn, args) of a flax decoder's SGD training step."""
    model = Decoder(layers=layers, scan=scan)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, seq),
                                                                            jnp.int32)))

    def flax_train_step(params: Any, tokens: jax.Array) -> tuple[Any, jax.Array]:
        def loss(p: Any) -> jax.Array:
            logits = model.apply(p, tokens)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

        value, grads = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda a, g: a - 1e-3 * g, params, grads), value

    return flax_train_step, (params, tokens)


REPEAT = 2  # plan times are the best of this many runs (the plans are the same: deterministic)


def _plan(build: Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]], target: str
          ) -> tuple[tiermap.Plan, float]:
    fn, args = build()
    best_s = float("inf")
    for _ in range(REPEAT):
        start = time.perf_counter()
        plan = tiermap.plan(fn, *args, target=target)
        best_s = min(best_s, time.perf_counter() - start)
    return plan, best_s


def twins(quick: bool) -> None:
    layers = 4 if quick else 12
    models: dict[str, Callable[[bool], tuple[Callable[..., Any], tuple[Any, ...]]]] = {
        "gpt-train": lambda scan: transformer_train(layers=layers, scan=scan),
        "flax-nnscan": lambda scan: flax_train(layers, scan),
    }
    targets = TARGETS[:1] if quick else TARGETS
    print(f"## Scanned against unrolled ({layers} layers)\n")
    print("| model | target | unrolled us | scan us | scan/unrolled | unrolled plan s | "
          "scan plan s | plan ratio | loops (trips) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, build in models.items():
        for target in targets:
            flat, flat_s = _plan(lambda b=build: b(False), target)
            loop, loop_s = _plan(lambda b=build: b(True), target)
            tname = Path(target).stem if target.endswith(".toml") else target
            trips = ", ".join(f"{x.op_id} ({x.trips})" for x in loop.loops)
            print(f"| {name} | {tname} | {flat.predicted_time_s * 1e6:.1f} | "
                  f"{loop.predicted_time_s * 1e6:.1f} | "
                  f"{loop.predicted_time_s / flat.predicted_time_s:.3f} | {flat_s:.1f} | "
                  f"{loop_s:.1f} | {loop_s / flat_s:.2f} | {trips} |", flush=True)


def deep(quick: bool) -> None:
    layers = 24 if quick else 96
    fn, args = transformer_train(layers=layers, scan=True)
    xla_s = plan_s = float("inf")
    for _ in range(REPEAT):
        jax.clear_caches()
        start = time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        xla_s = min(xla_s, time.perf_counter() - start)
        start = time.perf_counter()
        plan = tiermap.plan(fn, *args, target="sn40l")
        plan_s = min(plan_s, time.perf_counter() - start)
    print(f"\n## {layers}-layer scanned GPT training step\n")
    print("| XLA CPU compile s | tiermap plan s | plan / compile | predicted us |")
    print("|---|---|---|---|")
    print(f"| {xla_s:.2f} | {plan_s:.2f} | {plan_s / xla_s:.2f} | "
          f"{plan.predicted_time_s * 1e6:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers, one target")
    ns = parser.parse_args()
    twins(ns.quick)
    deep(ns.quick)


if __name__ == "__main__":
    main()
