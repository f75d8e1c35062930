"""Run on 8 host devices (a subprocess of test_sharded.py): for each sharded GPT training step,
what XLA says and what tiermap's IR says, as one JSON object on stdout.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding.run_8_devices
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile

if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

import tiermap  # noqa: E402
from tests.sharding.hlo_text import hlo_collective_bytes, memory_facts  # noqa: E402
from tiermap.cli import main as cli_main  # noqa: E402
from tiermap.examples.sharded import STYLES, GPTConfig, init_sharded, sharded_train_step  # noqa: E402
from tiermap.frontend.lowering import lower  # noqa: E402
from tiermap.pipeline import plan  # noqa: E402
from tiermap.plan_views import Plan  # noqa: E402


def facts(style: str) -> dict[str, object]:
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    fn, args = sharded_train_step(style, mesh)
    compiled = jax.jit(fn).lower(*args).compile()
    program = lower(fn, *args)
    tiermap_coll: dict[str, int] = {}
    for op in program.collectives:
        kind = str(op.attrs["collective"])
        tiermap_coll[kind] = tiermap_coll.get(kind, 0) + int(op.attrs["payload_bytes"])
    planned = plan(fn, *args, target="dgx-h100", strategy="greedy", time_limit_s=10.0)
    sharding = planned.sharding
    assert sharding is not None
    again = Plan.from_json(planned.to_json())
    decorated = decorated_vs_jit(fn, args)
    global_arg_bytes = sum(
        int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(args))
    return {
        "xla": {**memory_facts(compiled, len(program.outputs)),
                "collective_bytes": hlo_collective_bytes(compiled.as_text(), 8)},
        "tiermap": {
            "num_devices": program.num_devices,
            "argument_bytes": sum(program.values[v].nbytes for v in program.inputs),
            "output_bytes": sum(program.values[v].nbytes for v in program.outputs),
            "collective_bytes": tiermap_coll,
            "collective_groups": sorted({int(op.attrs["group_size"])
                                         for op in program.collectives}),
            "input_shardings": list(program.input_shardings),
            "output_shardings": list(program.output_shardings),
        },
        "global_argument_bytes": global_arg_bytes,
        "decorated": decorated,
        "plan": {"collective_bytes": sharding.bytes_by_kind(),
                 "step_time_s": sharding.step_time_s, "compute_s": sharding.compute_s,
                 "comm_s": sharding.comm_s, "exposed_comm_s": sharding.exposed_comm_s,
                 "predicted_time_s": planned.predicted_time_s,
                 "argument_bytes": sharding.argument_bytes,
                 "round_trips": again.sharding == sharding,
                 "peak_hbm_bytes": max(_peak(planned, "hbm"), 0)},
    }


def decorated_vs_jit(fn: object, args: tuple[object, ...]) -> dict[str, object]:
    """Run the step decorated and with jax.jit on the same sharded arrays."""
    real = init_sharded(args, seed=1, vocab=GPTConfig().vocab)
    step = tiermap.jit(fn, target="dgx-h100", strategy="greedy", time_limit_s=10.0)
    got = step(*real)
    want = jax.jit(fn)(*real)  # type: ignore[arg-type]
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    max_abs = max(float(abs(g - w).max()) for g, w in zip(got_leaves, want_leaves, strict=True))
    max_ref = max(float(abs(w).max()) for w in want_leaves)
    same = all(g.sharding.is_equivalent_to(w.sharding, g.ndim)
               for g, w in zip(got_leaves, want_leaves, strict=True))
    sharded_outputs = sum(1 for g in got_leaves if not g.sharding.is_fully_replicated)
    lowered = step.lower(*real)
    return {"max_abs_diff": max_abs, "max_abs_ref": max_ref, "shardings_equal": same,
            "sharded_outputs": sharded_outputs, "num_outputs": len(got_leaves),
            "notes": list(lowered.notes), "has_sharding_plan": lowered.plan().sharding is not None,
            "cache": list(step.cache_info())}


def _peak(planned: Plan, tier: str) -> int:
    """Peak bytes resident in `tier` over the plan's steps."""
    by_step = [0] * (planned.num_steps + 1)
    for t in planned.tensors:
        for r in t.residency:
            if r.tier == tier:
                for step in range(r.from_step, r.to_step + 1):
                    by_step[step] += t.nbytes
    return max(by_step)


def cli_facts(workdir: str) -> dict[str, object]:
    """`tiermap compile` on the FSDP step given as sharded StableHLO and as a Python builder."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    fn, args = sharded_train_step("fsdp", mesh)
    lowered = jax.jit(fn).lower(*args)
    mlir_path = os.path.join(workdir, "fsdp.mlir")
    with open(mlir_path, "w", encoding="utf-8") as fh:
        fh.write(lowered.as_text())
    compiled = lowered.compile()
    program = tiermap.lower_mlir(mlir_path)
    out: dict[str, object] = {
        "mlir_program": {"num_devices": program.num_devices,
                         "argument_bytes": sum(program.values[v].nbytes for v in program.inputs),
                         "output_bytes": sum(program.values[v].nbytes for v in program.outputs),
                         "collective_bytes": _collective_bytes(program)},
        "xla": {**memory_facts(compiled, len(program.outputs)),
                "collective_bytes": hlo_collective_bytes(compiled.as_text(), 8)},
    }
    runs = {}
    for label, source in (("mlir", mlir_path), ("py", "tiermap/examples/sharded.py:build_fsdp")):
        plan_path = os.path.join(workdir, f"{label}.json")
        report_path = os.path.join(workdir, f"{label}.md")
        buf = io.StringIO()
        code = cli_main(["compile", source, "--target", "dgx-h100", "--strategy", "greedy",
                         "--time-limit-s", "10", "-o", plan_path, "--report", report_path,
                         "--json"], out=buf, err=io.StringIO())
        summary = json.loads(buf.getvalue()) if code == 0 else {}
        with open(plan_path, encoding="utf-8") as fh:
            saved = json.load(fh)
        with open(report_path, encoding="utf-8") as fh:
            report = fh.read()
        runs[label] = {"exit": code, "summary_sharding": summary.get("sharding"),
                       "plan_collective_bytes": _kinds(saved["sharding"]["collectives"]),
                       "report_has_devices": "## Devices and interconnect" in report,
                       "report_lists": [k for k in ("all_gather", "all_reduce") if k in report]}
    out["cli"] = runs
    return out


def _collective_bytes(program: object) -> dict[str, int]:
    found: dict[str, int] = {}
    for op in program.collectives:  # type: ignore[attr-defined]
        kind = str(op.attrs["collective"])
        found[kind] = found.get(kind, 0) + int(op.attrs["payload_bytes"])
    return found


def _kinds(collectives: list[dict[str, object]]) -> dict[str, int]:
    found: dict[str, int] = {}
    for c in collectives:
        found[str(c["kind"])] = found.get(str(c["kind"]), 0) + int(c["payload_bytes"])  # type: ignore[call-overload]
    return found


def shard_map_facts() -> dict[str, object]:
    """A `jax.shard_map` step (rows of x over 8 devices, a psum of the partial sums): its
    per-device IR, its collective against the partitioned HLO, and the decorated run."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))

    def local(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.psum(jnp.tanh(x @ w).sum(0), "x")

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P("x", None), P(None, None)),
                       out_specs=P(None))
    x = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    w = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
    program = lower(fn, x, w)
    compiled = jax.jit(fn).lower(x, w).compile()
    planned = plan(fn, x, w, target="dgx-h100", time_limit_s=10.0)
    xr = jax.device_put(jnp.linspace(-1, 1, 1024 * 512, dtype=jnp.float32).reshape(1024, 512),
                        NamedSharding(mesh, P("x")))
    wr = jax.device_put(jnp.full((512, 256), 0.01, jnp.float32), NamedSharding(mesh, P()))
    got = tiermap.jit(fn, target="dgx-h100", time_limit_s=10.0)(xr, wr)
    want = jax.jit(fn)(xr, wr)
    return {"num_devices": program.num_devices,
            "input_shapes": [list(program.values[v].shape) for v in program.inputs],
            "collective_bytes": _collective_bytes(program),
            "xla_collective_bytes": hlo_collective_bytes(compiled.as_text(), 8),
            "plan_collective_bytes": planned.sharding.bytes_by_kind() if planned.sharding
            else {},
            "max_abs_diff": float(abs(got - want).max()),
            "shardings_equal": got.sharding.is_equivalent_to(want.sharding, got.ndim)}


def main() -> None:
    styles = sys.argv[1:] or list(STYLES)
    result: dict[str, object] = {style: facts(style) for style in styles}
    result["shard_map"] = shard_map_facts()
    with tempfile.TemporaryDirectory() as workdir:
        result["cli"] = cli_facts(workdir)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
