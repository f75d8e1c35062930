"""Attention tiling: predicted HBM traffic against FlashAttention-1 and the IO bound, the
FlashAttention paper's GPT-2 medium workload, and the applied program's memory on this CPU.

    python benchmarks/attention.py            # all three tables (a few minutes on 2 cores)
    python benchmarks/attention.py --quick    # traffic tables only

Prints markdown tables for docs/benchmarks.md ("Fusion and attention tiling").
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from tiermap.apply import apply_plan
from tiermap.costmodel import io_bounds as bounds
from tiermap.fusion.fuse import FusePass
from tiermap.fusion.tiling import (
    TilePass,
    fa1_forward_traffic_bytes,
    search_forward_tiles,
    tile_budget_bytes,
)
from tiermap.hardware.loader import load_target
from tiermap.pipeline import build_passes, plan

PAPER_STANDARD_HBM_BYTES = 40.3e9  # Dao et al. 2022, Fig. 2 (left): standard attention
PAPER_FLASH_HBM_BYTES = 4.4e9  # the same figure: FlashAttention
GPT2_ATTN_DROPOUT = 0.1  # GPT-2's attn_pdrop, on the attention probabilities


def traffic_table(target_name: str = "a100", elem_bytes: float = 2.0) -> list[str]:
    """Forward traffic per head: tiled search vs FlashAttention-1's rule vs the IO bound."""
    fast, tier = tile_budget_bytes(load_target(target_name))
    rows = [f"{target_name} {tier}: M = {fast} bytes per SM, fp16, one head, forward",
            "",
            "| N | d | tiles Br×Bc (order) | tiled MB | FA-1 Br×Bc | FA-1 MB | IO bound MB "
            "| tiled / FA-1 | tiled / bound |",
            "|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    for d in (64, 128):
        for n in (1024, 2048, 4096, 8192, 16384):
            t = search_forward_tiles(n, n, d, d, fast, elem_bytes)
            ref, fbr, fbc = fa1_forward_traffic_bytes(n, n, d, d, fast, elem_bytes)
            lb = bounds.attention_io_lower_bound_bytes(n, d, fast, elem_bytes)
            order = "q-outer" if t.q_outer else "kv-outer"
            rows.append(f"| {n} | {d} | {t.block_q}×{t.block_k} ({order}) "
                        f"| {t.traffic_bytes / 1e6:.2f} | {fbr}×{fbc} | {ref / 1e6:.2f} "
                        f"| {lb / 1e6:.2f} | {t.traffic_bytes / ref:.2f} "
                        f"| {t.traffic_bytes / lb:.2f} |")
    return rows


def _paper_fn(layout: str, rng: str | None = None) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """Causal attention forward + backward (o, dq, dk, dv) of GPT-2 medium's shape, fp16.

    With `rng` (a jax PRNG implementation; `bhnd` only) the probabilities go through GPT-2's
    attention dropout: a Bernoulli keep-mask from a raw key, the last argument (not
    differentiated), and `where(mask, p / (1 - GPT2_ATTN_DROPOUT), 0)` before the second product.
    """
    b, h, n, d = 64, 16, 1024, 64
    if layout == "bhnd":
        def attn(q: jax.Array, k: jax.Array, v: jax.Array, key: jax.Array | None) -> jax.Array:
            s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.float16(d))
            s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, jnp.float16(-1e4))
            p = jax.nn.softmax(s, axis=-1)
            if key is not None:
                keep = jax.random.bernoulli(jax.random.wrap_key_data(key, impl=rng),
                                            1.0 - GPT2_ATTN_DROPOUT, p.shape)
                p = jnp.where(keep, p / jnp.float16(1.0 - GPT2_ATTN_DROPOUT), jnp.float16(0))
            return jnp.einsum("bhqk,bhkd->bhqd", p, v)
        shape = (b, h, n, d)
    else:
        assert rng is None, "dropout only in the einsum form"

        def attn(q: jax.Array, k: jax.Array, v: jax.Array, key: jax.Array | None) -> jax.Array:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        shape = (b, n, h, d)

    def fwd_bwd(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array,
                key: jax.Array | None = None) -> Any:
        o, vjp = jax.vjp(partial(attn, key=key), q, k, v)
        return (o, *vjp(do))

    sds = jax.ShapeDtypeStruct(shape, jnp.float16)
    if rng is None:
        return fwd_bwd, (sds, sds, sds, sds)
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=rng)))
    return fwd_bwd, (sds, sds, sds, sds, key)


def paper_table(time_limit_s: float = 20.0) -> list[str]:
    """Predicted HBM bytes of the GPT-2 medium attention (fwd + bwd) on a100, fused vs not."""
    rows = ["| program | plan | predicted HBM GB | paper measured GB | attention groups | "
            "predicted time ms |",
            "|---|---|---:|---:|---|---:|"]
    ratios = []
    dropout = f"softmax + dropout(p={GPT2_ATTN_DROPOUT})"
    for layout, rng, label in (
            ("bhnd", None, "einsum + causal where + softmax, [B,H,N,d]"),
            ("bnhd", None, "jax.nn.dot_product_attention(is_causal), [B,N,H,d]"),
            ("bhnd", "threefry2x32", f"einsum + causal where + {dropout}, threefry key, "
                                     "[B,H,N,d]"),
            ("bhnd", "rbg", f"einsum + causal where + {dropout}, rbg key, [B,H,N,d]")):
        fn, args = _paper_fn(layout, rng)
        fused = plan(fn, *args, target="a100", workers=1, time_limit_s=time_limit_s)
        base = build_passes("mip", time_limit_s, 0, "highs", 1, fusion=False)
        standard = plan(fn, *args, target="a100", time_limit_s=time_limit_s,
                        passes=base[:2] + [FusePass(attention=False), TilePass()] + base[2:])
        naive = plan(fn, *args, target="a100", strategy="naive", time_limit_s=time_limit_s)
        groups = ", ".join(sorted({t.group for t in fused.tiles if "attn" in t.group}))
        f_gb = fused.traffic_bytes.get("hbm", 0.0) / 1e9
        s_gb = standard.traffic_bytes.get("hbm", 0.0) / 1e9
        n_gb = naive.traffic_bytes.get("hbm", 0.0) / 1e9
        rows.append(f"| {label} | every op alone (naive) | {n_gb:.1f} | | — | "
                    f"{naive.predicted_time_s * 1e3:.2f} |")
        rows.append(f"| {label} | standard: chains fused, no attention tiling | {s_gb:.1f} | "
                    f"{PAPER_STANDARD_HBM_BYTES / 1e9:.1f} (standard) | — | "
                    f"{standard.predicted_time_s * 1e3:.2f} |")
        rows.append(f"| {label} | fused + tiled (mip) | {f_gb:.2f} | "
                    f"{PAPER_FLASH_HBM_BYTES / 1e9:.1f} (FlashAttention) | {groups} | "
                    f"{fused.predicted_time_s * 1e3:.2f} |")
        ratios.append(f"{label}: standard / tiled = {s_gb / f_gb:.1f}× "
                      f"(paper: {PAPER_STANDARD_HBM_BYTES / PAPER_FLASH_HBM_BYTES:.1f}×), "
                      f"naive / tiled = {n_gb / f_gb:.1f}×")
    return rows + [""] + ratios


def _temp_bytes(compiled: Any) -> int:
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes) if stats is not None else -1


def _best_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_memory_table(n: int = 8192, d: int = 64, heads: tuple[int, ...] = (1, 4),
                     repeats: int = 3) -> list[str]:
    """XLA temp bytes and wall time here: attention applied from an h100 plan vs jax's."""
    rows = ["| heads | program | XLA temp MB | wall s (median) | temp ratio |",
            "|---:|---|---:|---:|---:|"]

    def ref(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    for h in heads:
        sds = jax.ShapeDtypeStruct((1, n, h, d), jnp.float32)
        p = plan(ref, sds, sds, sds, target="h100", workers=1, time_limit_s=10)
        applied = apply_plan(ref, p)
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (1, n, h, d), jnp.float32) for key in keys)
        runs = {}
        for name, fn in (("applied (h100 plan)", applied), ("jax.nn.dot_product_attention",
                                                            jax.jit(ref))):
            compiled = fn.lower(q, k, v).compile()
            runs[name] = (_temp_bytes(compiled), _best_s(partial(compiled, q, k, v), repeats))
        for name in ("applied (h100 plan)", "jax.nn.dot_product_attention"):
            temp, wall = runs[name]
            ratio = runs["jax.nn.dot_product_attention"][0] / max(temp, 1)
            rows.append(f"| {h} | {name} | {temp / 1e6:.1f} | {wall:.2f} | "
                        f"{ratio:.0f}× |" if name.startswith("applied") else
                        f"| {h} | {name} | {temp / 1e6:.1f} | {wall:.2f} | 1× |")
        rows.append(f"|  | blocks | {applied.notes[0].split('blocks ')[1].split(' (')[0]} "
                    "| | |")
        if h != heads[0]:
            continue
        # forward + backward: the applied kernel's custom_vjp recomputes P blockwise.
        grads = {}
        for name, fn in (("applied, jax.grad", applied), ("jax.nn, jax.grad", ref)):
            g = jax.jit(jax.grad(lambda q, k, v, f=fn: jnp.sum(f(q, k, v) ** 2),
                                 argnums=(0, 1, 2)))
            compiled = g.lower(q, k, v).compile()
            grads[name] = (_temp_bytes(compiled), _best_s(partial(compiled, q, k, v), repeats))
        # jax.grad inside the planned function: the plan has attn0 and attn0_bwd, and apply
        # replaces the backward jax wrote out as well.
        def inner_grad(q: jax.Array, k: jax.Array, v: jax.Array) -> Any:
            return jax.grad(lambda *a: jnp.sum(ref(*a) ** 2), argnums=(0, 1, 2))(q, k, v)

        p_grad = plan(inner_grad, sds, sds, sds, target="h100", workers=1, time_limit_s=10)
        applied_grad = apply_plan(inner_grad, p_grad)
        for name, fn in (("grad inside, applied (h100 plan)", applied_grad),
                         ("grad inside, jax.jit", jax.jit(inner_grad))):
            compiled = fn.lower(q, k, v).compile()
            grads[name] = (_temp_bytes(compiled), _best_s(partial(compiled, q, k, v), repeats))
        pairs = (("applied, jax.grad", "jax.nn, jax.grad"),
                 ("grad inside, applied (h100 plan)", "grad inside, jax.jit"))
        for mine, theirs in pairs:
            for name in (mine, theirs):
                temp, wall = grads[name]
                ratio = grads[theirs][0] / max(temp, 1)
                rows.append(f"| {h} | {name} | {temp / 1e6:.1f} | {wall:.2f} | {ratio:.0f}× |")
        bwd = next((t for t in p_grad.tiles if t.group == "attn0_bwd"), None)
        if bwd is not None:
            rows.append(f"|  | backward blocks (plan) | {bwd.params['block_q_dkv']}x"
                        f"{bwd.params['block_kv_dkv']} | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="traffic tables only")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, python {platform.python_version()}, {platform.machine()}")
    print()
    print("\n".join(traffic_table()))
    print()
    print("\n".join(paper_table()))
    if not args.quick:
        print()
        print("\n".join(cpu_memory_table()))


if __name__ == "__main__":
    main()
