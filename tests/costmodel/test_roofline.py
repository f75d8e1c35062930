"""Roofline op and kernel costs, checked against numbers worked out by hand.

Target (tests/costmodel/helpers.py): 'fast' reads 1e12 B/s and writes 5e11 B/s, 'slow' reads 1e11
and writes 5e10; peak 1e12 FLOP/s f32, 4e12 bf16; 1 µs per-op overhead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from tests.costmodel.helpers import OVERHEAD_S, cpu_like, two_tier_target
from tiermap.costmodel import (
    Cost,
    compute_time_s,
    group_cost,
    op_cost,
    operand_read_bytes,
    result_write_bytes,
    transfer_time_s,
)
from tiermap.costmodel.roofline import CPU_MEASURED, peak_flops_per_s, units_used
from tiermap.errors import TiermapError
from tiermap.frontend.lowering import lower
from tiermap.hardware import Target
from tiermap.ir.fusion import FusionGroup

S = jax.ShapeDtypeStruct
F32 = jnp.float32


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    s = q @ k.T / 8.0
    return jax.nn.softmax(s, axis=-1) @ v


@pytest.fixture(scope="module")
def attention_program():  # type: ignore[no-untyped-def]
    return lower(_attention, S((128, 64), F32), S((128, 64), F32), S((128, 64), F32))


def test_cost_adds_and_zero() -> None:
    a = Cost({"f32": 10.0}, {"fast": 4.0}, 1.0)
    b = Cost({"f32": 5.0, "bf16": 2.0}, {"slow": 8.0, "fast": 1.0}, 0.5)
    total = a + b
    assert dict(total.flops_by_dtype) == {"f32": 15.0, "bf16": 2.0}
    assert dict(total.bytes_by_tier) == {"fast": 5.0, "slow": 8.0}
    assert total.time_s == 1.5
    assert a + Cost.zero() == a
    assert sum([a, b]) == total
    assert total.flops == 17.0 and total.bytes == 13.0


def test_matmul_compute_bound_by_hand() -> None:
    p = lower(lambda a, b: a @ b, S((128, 256), F32), S((256, 64), F32))
    (op,) = p.ops
    assert op.flops == 2 * 128 * 64 * 256
    tgt = two_tier_target()
    cost = op_cost(op, p, tgt, ["fast", "slow"], ["slow"])
    compute_s = 4_194_304 / 1e12
    memory_s = 131_072 / 1e12 + 65_536 / 1e11 + 32_768 / 5e10
    assert compute_time_s(op, tgt) == pytest.approx(compute_s)
    assert cost.time_s == pytest.approx(max(compute_s, memory_s) + OVERHEAD_S)
    assert cost.time_s == pytest.approx(5.194304e-6)
    assert dict(cost.bytes_by_tier) == {"fast": 131_072, "slow": 65_536 + 32_768}
    assert dict(cost.flops_by_dtype) == {"f32": 4_194_304}


def test_bf16_matmul_memory_bound_by_hand() -> None:
    bf16 = jnp.bfloat16
    p = lower(lambda a, b: a @ b, S((128, 256), bf16), S((256, 64), bf16))
    (op,) = p.ops
    tgt = two_tier_target()
    cost = op_cost(op, p, tgt, ["slow", "slow"], ["slow"])
    # compute 4194304 / 4e12 = 1.048576 µs; memory 98304/1e11 + 16384/5e10 = 1.31072 µs.
    assert compute_time_s(op, tgt) == pytest.approx(1.048576e-6)
    assert cost.time_s == pytest.approx(1.31072e-6 + OVERHEAD_S)


def test_elementwise_by_hand() -> None:
    p = lower(lambda a, b: a + b, S((1000,), F32), S((1000,), F32))
    (op,) = p.ops
    tgt = two_tier_target()
    cost = op_cost(op, p, tgt, ["slow", "slow"], ["fast"])
    # compute 1000 / 1e12; memory 8000/1e11 + 4000/5e11 = 88 ns.
    assert cost.time_s == pytest.approx(8.8e-8 + OVERHEAD_S)
    assert dict(cost.bytes_by_tier) == {"slow": 8000, "fast": 4000}


def test_elementwise_low_precision_runs_at_most_at_f32_peak() -> None:
    p = lower(lambda a: a * a, S((1000,), jnp.bfloat16))
    tgt = two_tier_target()
    assert peak_flops_per_s(p.ops[0], tgt) == 1e12  # not the 4e12 bf16 matrix peak


def test_reduction_by_hand() -> None:
    p = lower(lambda x: jnp.sum(x, axis=1), S((64, 128), F32))
    op = p.ops[1]
    assert op.kind == "stablehlo.reduce" and op.flops == 64 * 127
    tgt = two_tier_target()
    # Reads x (32768 B) and the scalar init (4 B) from fast, writes 64 floats to slow.
    assert operand_read_bytes(op, p) == [32_768, 4]
    cost = op_cost(op, p, tgt, ["fast", "fast"], ["slow"])
    memory_s = 32_772 / 1e12 + 256 / 5e10
    assert cost.time_s == pytest.approx(memory_s + OVERHEAD_S)
    assert cost.time_s == pytest.approx(3.7892e-8 + 1e-6)


def test_convolution_by_hand() -> None:
    # Asymmetric padding, so the two spatial dimensions count different valid taps.
    p = lower(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (2, 2))),
              S((1, 8, 16, 16), F32), S((16, 8, 3, 3), F32))
    (op,) = p.ops
    # Implicit GEMM m = N·Ho·Wo = 288, n = Cout = 16, k = Cin·R·S = 72; only taps that land on
    # real input count: 46 (rows) × 48 (columns) valid positions.
    assert op.attrs["n"] * op.attrs["out_spatial"] == 288
    assert op.attrs["cin"] * op.attrs["taps"] == 72
    assert op.flops == 2 * 8 * 16 * 46 * 48 <= 2 * 288 * 16 * 72
    tgt = two_tier_target()
    cost = op_cost(op, p, tgt, ["fast", "fast"], ["fast"])
    memory_s = (8192 + 4608) / 1e12 + 18_432 / 5e11  # 49.664 ns
    compute_s = 565_248 / 1e12
    assert memory_s < compute_s
    assert cost.time_s == pytest.approx(compute_s + OVERHEAD_S)


def test_attention_ops_by_hand(attention_program) -> None:  # type: ignore[no-untyped-def]
    p = attention_program
    tgt = two_tier_target()
    dots = [op for op in p.ops if op.kind == "stablehlo.dot_general"]
    qk, pv = dots
    assert qk.kind == "stablehlo.dot_general" and qk.flops == 2 * 128 * 128 * 64
    # QKᵀ all in slow: memory 65536/1e11 + 65536/5e10 = 1.96608 µs < compute 2.097152 µs.
    assert op_cost(qk, p, tgt, ["slow", "slow"], ["slow"]).time_s == pytest.approx(
        2.097152e-6 + OVERHEAD_S)
    scale = next(op for op in p.ops if op.kind == "stablehlo.divide")
    # S / 8: reads two 64 KiB operands, writes one: 131072/1e11 + 65536/5e10 = 2.62144 µs.
    assert op_cost(scale, p, tgt, ["slow", "slow"], ["slow"]).time_s == pytest.approx(
        2.62144e-6 + OVERHEAD_S)
    exp = next(op for op in p.ops if op.kind == "stablehlo.exponential")
    assert exp.transcendentals == 128 * 128
    assert compute_time_s(exp, tgt) == pytest.approx(16_384 / 1e12)  # 1 flop each on "tpu"
    # On "cpu" a transcendental costs `transcendental_flops` vector flops, and loop code runs at
    # `vector_peak_fraction` of the f32 peak.
    cpu = CPU_MEASURED
    assert compute_time_s(exp, cpu_like(two_tier_target(platform="cpu"))) == pytest.approx(
        cpu.transcendental_flops * 16_384 / (1e12 * cpu.vector_peak_fraction))
    memory_s = 65_536 / 1e12 + 32_768 / 1e11 + 32_768 / 5e10
    assert op_cost(pv, p, tgt, ["fast", "slow"], ["slow"]).time_s == pytest.approx(
        max(2.097152e-6, memory_s) + OVERHEAD_S)


def test_fused_attention_group_by_hand(attention_program) -> None:  # type: ignore[no-untyped-def]
    p = attention_program
    tgt = two_tier_target()
    # Everything after the transpose of K is one kernel; its only output is O.
    assert p.ops[0].kind == "stablehlo.transpose"
    out = p.outputs[0]
    op_ids = tuple(op.id for op in p.ops[1:])
    internal = frozenset(v for op in p.ops[1:] for v in op.outputs) - {out}
    compute_s = sum(op.flops + op.transcendentals for op in p.ops) / 1e12
    tiers = {"t0": "slow", "t2": "slow", "t3": "slow", out: "slow"}
    group = FusionGroup("attn0", "attention", op_ids, internal)
    cost = group_cost(group, p, tgt, tiers)
    # External: Q, Kᵀ, V read once (3 × 32 KiB), O written once; one overhead.
    memory_s = 98_304 / 1e11 + 32_768 / 5e10
    assert cost.time_s == pytest.approx(max(compute_s, memory_s) + OVERHEAD_S)
    assert dict(cost.bytes_by_tier) == {"slow": 4 * 32_768}
    # FlashAttention re-reads K and V once per query block.
    tiled = FusionGroup("attn0", "attention", op_ids, internal, {"t3": 8.0, "t2": 8.0})
    cost = group_cost(tiled, p, tgt, tiers)
    memory_s = (32_768 + 16 * 32_768) / 1e11 + 32_768 / 5e10
    assert memory_s > compute_s
    assert cost.time_s == pytest.approx(memory_s + OVERHEAD_S)
    with pytest.raises(TiermapError, match="no tier given for tensor t3"):
        group_cost(group, p, tgt, {"t0": "slow"})


def test_partial_readers_read_what_they_use() -> None:
    def f(x: jax.Array, i: jax.Array) -> tuple[jax.Array, ...]:
        return (x[2:5], lax.dynamic_update_slice(x, jnp.ones((2, 8)), (i, 0)),
                x[jnp.array([1, 3])])

    p = lower(f, S((16, 8), F32), S((), jnp.int32))
    by_kind = {op.kind: op for op in p.ops}
    sl = by_kind["stablehlo.slice"]
    assert operand_read_bytes(sl, p) == [96]  # 3 rows × 8 floats, not the 512-byte operand
    dus = by_kind["stablehlo.dynamic_update_slice"]
    assert operand_read_bytes(dus, p) == [0, 64, 4, 4]  # the update and the indices
    assert result_write_bytes(dus, p) == [64]
    gather = by_kind["stablehlo.gather"]
    assert operand_read_bytes(gather, p) == [64, 8]
    for op in p.ops:
        assert sum(operand_read_bytes(op, p)) == op.bytes_read
        assert sum(result_write_bytes(op, p)) == op.bytes_written


def test_transfer_time_uses_link_or_slower_tier() -> None:
    assert transfer_time_s(1e6, "fast", "slow", two_tier_target()) == pytest.approx(1e6 / 5e10)
    linked = two_tier_target(link_bytes_per_s=2e10)
    assert transfer_time_s(1e6, "slow", "fast", linked) == pytest.approx(5e-5)


def test_op_cost_rejects_wrong_tier_count() -> None:
    p = lower(lambda a, b: a + b, S((4,), F32), S((4,), F32))
    with pytest.raises(TiermapError, match="2 inputs"):
        op_cost(p.ops[0], p, two_tier_target(), ["fast"], ["fast"])


def test_small_ops_do_not_keep_every_unit_busy() -> None:
    from dataclasses import replace

    cpu = CPU_MEASURED
    tgt = replace(cpu_like(two_tier_target(platform="cpu")), units=4)
    grain = cpu.parallel_grain_elements
    small = lower(lambda a, b: a @ b, S((64, 64), F32), S((64, 64), F32)).ops[0]
    big = lower(lambda a, b: a @ b, S((1024, 1024), F32), S((1024, 64), F32)).ops[0]
    assert 64 * 64 < grain and units_used(small, tgt) == 1.0
    assert units_used(big, tgt) == min(4.0, 1024 * 64 / grain)
    # One unit of four: a quarter of the peak.
    assert compute_time_s(small, tgt) == pytest.approx(2 * 64**3 / (1e12 / 4))
    # Accelerators: no grain, every unit busy.
    assert units_used(small, replace(two_tier_target(), units=4)) == 4.0


def test_compute_figures_come_from_the_target_not_the_lowering_platform() -> None:
    # sn40l lowers for "cpu" but has no CPU loop-code penalty: an exp costs one flop at peak.
    from tiermap.hardware import load_target

    sn40l = load_target("sn40l")
    assert sn40l.platform == "cpu" and sn40l.vector_peak_fraction == 1.0
    exp = next(op for op in lower(jnp.exp, jax.ShapeDtypeStruct((1024,), jnp.float32)).ops
               if op.kind == "stablehlo.exponential")
    assert compute_time_s(exp, replace_units(sn40l)) == pytest.approx(1024 / sn40l.peak("f32"))
    cpu = load_target("cpu")
    assert cpu.vector_peak_fraction == CPU_MEASURED.vector_peak_fraction
    assert cpu.transcendental_flops == CPU_MEASURED.transcendental_flops


def replace_units(target: Target) -> Target:
    """One unit, so the grain rule cannot matter."""
    from dataclasses import replace

    return replace(target, units=1)
