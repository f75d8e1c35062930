"""Sharded programs on 8 host devices: tiermap's per-device IR against XLA, and predicted steps.

    python benchmarks/sharded.py            # all tables (about a minute on 2 cores)
    python benchmarks/sharded.py --quick    # the small steps only

Sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported. Prints markdown
tables for docs/benchmarks.md ("Sharded programs"):

1. the issue's example: x f32[8192, 4096] sharded 8 ways along its rows, planned before (the
   global program on one device) and now (the per-device program);
2. data-parallel, FSDP-style and tensor-parallel GPT training steps
   (tiermap/examples/sharded.py): per-device argument and output bytes against
   `compiled.memory_analysis()` (less the output tuple's pointer table, 8 B per output), and
   collective payload bytes against the partitioned HLO text;
3. a bigger tensor-parallel GPT step on dgx-h100: tiermap's predicted step against the
   hand-worked estimate compute / 8 + all-reduce bytes / NVLink bandwidth, and the same steps
   predicted on tpu-v5e-8 and sn40l-node.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tiermap  # noqa: E402
from tests.sharding.hlo_text import hlo_collective_bytes, memory_facts  # noqa: E402
from tiermap.examples.sharded import GPTConfig, sharded_train_step  # noqa: E402
from tiermap.frontend.lowering import lower  # noqa: E402

MB = 1e6


def _mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def issue_example() -> None:
    """x f32[8192, 4096] sharded 8 ways by rows, times a replicated w f32[4096, 1024]."""
    mesh = _mesh()
    x = jax.ShapeDtypeStruct((8192, 4096), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    w = jax.ShapeDtypeStruct((4096, 1024), jnp.float32, sharding=NamedSharding(mesh, P()))

    def project(x: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.tanh(x @ w).sum(axis=0)

    unsharded = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype))
    before = lower(project, *unsharded)
    now = lower(project, x, w)
    compiled = jax.jit(project).lower(x, w).compile()
    ma = memory_facts(compiled, 1)
    print("| program | x as planned | x bytes | arguments | XLA arguments | collectives |")
    print("|:--|:--|--:|--:|--:|:--|")
    for label, prog in (("global (before)", before), ("per device (now)", now)):
        xv = prog.values[prog.inputs[0]]
        args = sum(prog.values[v].nbytes for v in prog.inputs)
        coll = ", ".join(f"{op.attrs['collective']} {op.attrs['payload_bytes'] / MB:.3f} MB"
                         for op in prog.collectives) or "none"
        print(f"| {label} | {xv.type} | {xv.nbytes / MB:.1f} MB | {args / MB:.1f} MB | "
              f"{ma['argument_bytes'] / MB:.1f} MB | {coll} |")
    print()


def xla_agreement(cfg: GPTConfig) -> None:
    mesh = _mesh()
    print("| step | global args | per-device args: tiermap / XLA | outputs: tiermap / XLA | "
          "collective payload: tiermap | partitioned HLO | ops | planned (greedy, dgx-h100) |")
    print("|:--|--:|--:|--:|:--|:--|--:|--:|")
    for style in ("dp", "fsdp", "tp"):
        fn, args = sharded_train_step(style, mesh, cfg)
        compiled = jax.jit(fn).lower(*args).compile()
        start = time.perf_counter()
        program = lower(fn, *args)
        read_s = time.perf_counter() - start
        ma = memory_facts(compiled, len(program.outputs))
        hlo = hlo_collective_bytes(compiled.as_text(), 8)
        ours: dict[str, int] = {}
        for op in program.collectives:
            kind = str(op.attrs["collective"])
            ours[kind] = ours.get(kind, 0) + int(op.attrs["payload_bytes"])
        start = time.perf_counter()
        tiermap.plan(program, target="dgx-h100", strategy="greedy", time_limit_s=10.0)
        plan_s = time.perf_counter() - start
        glob = sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(args))
        args_b = sum(program.values[v].nbytes for v in program.inputs)
        outs_b = sum(program.values[v].nbytes for v in program.outputs)
        fmt = lambda d: ", ".join(f"{k} {v:,}" for k, v in sorted(d.items()))  # noqa: E731
        print(f"| {style} | {glob:,} | {args_b:,} / {ma['argument_bytes']:,} | "
              f"{outs_b:,} / {ma['output_bytes']:,} | {fmt(ours)} | {fmt(hlo)} | "
              f"{program.num_steps} | read {read_s:.1f} s (compile cached) + plan {plan_s:.1f} s |")
    print()


def dgx_tp_estimate(cfg: GPTConfig) -> None:
    """tiermap's predicted TP step on dgx-h100 against compute / 8 + all-reduce bytes / NVLink."""
    mesh = _mesh()
    fn, args = sharded_train_step("tp", mesh, cfg)
    unsharded = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    flops = float(jax.jit(fn).lower(*unsharded).cost_analysis()["flops"])
    target = tiermap.target("dgx-h100")
    assert target.interconnect is not None
    peak = target.peak("f32")
    nvlink = target.interconnect.device_bytes_per_s
    planned = tiermap.plan(fn, *args, target=target, strategy="greedy", time_limit_s=20.0)
    sp = planned.sharding
    assert sp is not None
    ar_bytes = sp.bytes_by_kind().get("all_reduce", 0)
    tokens = cfg.batch * cfg.seq
    megatron = 4 * cfg.layers * tokens * cfg.d_model * 4  # 2 fwd + 2 bwd per block, f32
    compute_s = flops / 8 / peak
    naive_comm_s = ar_bytes / nvlink
    ring_comm_s = 2 * 7 / 8 * ar_bytes / nvlink
    matmul_flops = sum(op.flops for op in planned.program.ops  # type: ignore[union-attr]
                       if op.kind.endswith(("dot_general", "dot")))
    print(f"GPT {cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, seq {cfg.seq}, "
          f"batch {cfg.batch}, vocab {cfg.vocab}, f32, SGD; tensor-parallel over 8 H100s.")
    print()
    print("| quantity | value |")
    print("|:--|--:|")
    rows = [
        ("global step FLOPs (XLA cost analysis, one device)", f"{flops:.4g}"),
        ("per-device matmul FLOPs in the partitioned program", f"{matmul_flops:.4g}"),
        ("H100 f32 peak", f"{peak:.4g} FLOP/s"),
        ("compute / 8 = FLOPs / 8 / peak", f"{compute_s * 1e6:.1f} us"),
        ("all-reduce payload per step (partitioned HLO)", f"{ar_bytes:,} B"),
        ("Megatron count 4 x layers x tokens x d_model x 4 B", f"{megatron:,} B"),
        ("NVLink per GPU, one direction (18 x 25 GB/s)", f"{nvlink:.4g} B/s"),
        ("all-reduce bytes / NVLink", f"{naive_comm_s * 1e6:.1f} us"),
        ("hand-worked estimate: compute / 8 + all-reduce bytes / NVLink",
         f"{(compute_s + naive_comm_s) * 1e6:.1f} us"),
        ("same, with the ring factor 2(n-1)/n on the bytes",
         f"{(compute_s + ring_comm_s) * 1e6:.1f} us"),
        ("tiermap: per-device plan (compute stream)", f"{sp.compute_s * 1e6:.1f} us"),
        ("tiermap: communication (link time incl. latency)", f"{sp.comm_s * 1e6:.1f} us"),
        ("tiermap: exposed communication", f"{sp.exposed_comm_s * 1e6:.1f} us"),
        ("tiermap: predicted step with communication", f"{sp.step_time_s * 1e6:.1f} us"),
        ("tiermap / hand-worked (ring factor)",
         f"{sp.step_time_s / (compute_s + ring_comm_s):.2f}x"),
    ]
    for label, value in rows:
        print(f"| {label} | {value} |")
    print()
    print("| step | target | per-device args | compute | communication | exposed | step |"
          " overlap |")
    print("|:--|:--|--:|--:|--:|--:|--:|--:|")
    for style in ("dp", "fsdp", "tp"):
        fn, args = sharded_train_step(style, mesh, cfg)
        program = lower(fn, *args)
        for name in ("dgx-h100", "tpu-v5e-8", "sn40l-node"):
            sp2 = tiermap.plan(program, target=name, strategy="greedy",
                               time_limit_s=20.0).sharding
            assert sp2 is not None
            print(f"| {style} | {name} | {sp2.argument_bytes / MB:.1f} MB | "
                  f"{sp2.compute_s * 1e6:.0f} us | {sp2.comm_s * 1e6:.0f} us | "
                  f"{sp2.exposed_comm_s * 1e6:.0f} us | {sp2.step_time_s * 1e6:.0f} us | "
                  f"{100 * sp2.overlap_fraction:.0f}% |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    ns = parser.parse_args()
    issue_example()
    xla_agreement(GPTConfig())
    if not ns.quick:
        big = GPTConfig(layers=4, d_model=1024, heads=16, seq=256, batch=8, vocab=2048)
        xla_agreement(big)
        dgx_tp_estimate(big)


if __name__ == "__main__":
    main()
