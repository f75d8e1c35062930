"""The working-set cost model of calibrated CPU targets: hand-computed numbers for single ops."""

from __future__ import annotations

import math
from dataclasses import replace

import jax
import jax.numpy as jnp
import pytest

from tiermap.costmodel import working_set
from tiermap.costmodel.roofline import compute_time_s, op_cost
from tiermap.frontend.lowering import lower
from tiermap.hardware import load_target
from tiermap.hardware.target import Target, Tier
from tiermap.ir.program import Op

KIB, MIB = 2**10, 2**20


def _target(**changes: object) -> Target:
    base = Target(
        name="hand-ws", description="hand-made calibrated 2-core CPU", platform="cpu",
        peak_flops_per_s={"f32": 2e11}, units=2, op_overhead_s=1e-6,
        vector_peak_fraction=0.5, parallel_grain_elements=0.0, working_set_tiers=True,
        reduce_flops_per_s=2e10,
        transcendental_per_s={"exponential": 2e9, "tanh": 4e9},
        matmul_flops_per_s={"f32": ((64, 5e10), (512, 2e11))},
        tiers=(Tier("l1", 64 * KIB, 1e11, 1e11, per_unit=True, copy_bytes_per_s=1e11),
               Tier("l2", 2 * MIB, 1e11, 5e10, per_unit=True, copy_bytes_per_s=8e10),
               Tier("l3", 32 * MIB, 8e10, 4e10, per_unit=True, copy_bytes_per_s=6e10),
               Tier("dram", 16 * 2**30, 3e10, 2e10, copy_bytes_per_s=2.5e10,
                    first_touch_bytes_per_s=5e9, first_touch_min_bytes=32 * MIB)))
    return replace(base, **changes)  # type: ignore[arg-type]


def test_applies_only_when_the_target_asks() -> None:
    assert working_set.applies(_target())
    assert not working_set.applies(load_target("cpu"))
    assert not working_set.applies(load_target("h100"))


def test_working_set_tier_is_the_fastest_that_holds_it() -> None:
    t = _target()
    assert working_set.working_set_tier_index(64 * KIB, t) == 0
    assert working_set.working_set_tier_index(64 * KIB + 1, t) == 1
    assert working_set.working_set_tier_index(32 * MIB, t) == 2
    assert working_set.working_set_tier_index(1e12, t) == 3


def test_stream_time_pairs_reads_with_writes_at_the_copy_rate() -> None:
    tier = _target().tiers[2]  # read 8e10, write 4e10, copy 6e10
    # 3 MB read, 1 MB written: 1 MB pairs (2 MB at the copy rate), 2 MB more are read.
    expected = 2e6 / 6e10 + 2e6 / 8e10
    assert working_set.stream_time_s(3e6, 1e6, tier) == pytest.approx(expected)
    assert working_set.stream_time_s(3e6, 0.0, tier) == pytest.approx(3e6 / 8e10)
    no_copy = replace(tier, copy_bytes_per_s=None)
    assert working_set.stream_time_s(3e6, 1e6, no_copy) == pytest.approx(3e6 / 8e10 + 1e6 / 4e10)


def test_tier_centres_and_interpolation() -> None:
    t = _target()
    centres = working_set.tier_centers_bytes(t)
    assert centres == pytest.approx([math.sqrt(8 * KIB * 64 * KIB), math.sqrt(64 * KIB * 2 * MIB),
                                     math.sqrt(2 * MIB * 32 * MIB), 48 * MIB])
    # At a tier's centre its own figures; half way (in log) between two centres, the geometric
    # mean of theirs.
    at_l3 = working_set.working_set_tier(centres[2], t)
    assert at_l3.read_bytes_per_s == pytest.approx(8e10)
    mid = math.sqrt(centres[2] * centres[3])
    between = working_set.working_set_tier(mid, t)
    assert between.read_bytes_per_s == pytest.approx(math.sqrt(8e10 * 3e10))
    assert between.copy_bytes_per_s == pytest.approx(math.sqrt(6e10 * 2.5e10))
    assert working_set.working_set_tier(1e12, t).read_bytes_per_s == pytest.approx(3e10)


def test_main_memory_bytes_stream_from_the_cache_that_holds_the_working_set() -> None:
    t = _target()
    centre_l2 = working_set.tier_centers_bytes(t)[1]
    # A kernel reading and writing centre_l2 / 2 bytes each, placed in dram: charged at l2.
    half = centre_l2 / 2
    got = working_set.memory_time_s({"dram": half}, {"dram": half}, t)
    assert got == pytest.approx(2 * half / 8e10)
    # A large read-only kernel far past l3 is charged at dram.
    big = 1e10
    assert working_set.memory_time_s({"dram": big}, {}, t) == pytest.approx(big / 3e10)


def test_first_touch_outputs_pay_the_fresh_page_rate() -> None:
    t = _target()
    out = 64 * MIB
    assert working_set.first_touch_bytes([("dram", out), ("dram", 1 * MIB)], t) == out
    fresh = working_set.memory_time_s({}, {"dram": out}, t, first_touch_write_bytes=out)
    assert fresh == pytest.approx(out / 5e9)


def test_matmul_rate_interpolates_in_log_n_and_clamps() -> None:
    t = _target()
    assert working_set.matmul_rate_flops_per_s("f32", 2 * 32**3, t) == 5e10  # below: clamped
    assert working_set.matmul_rate_flops_per_s("f32", 2 * 1024**3, t) == 2e11  # above
    mid_n = math.sqrt(64 * 512)
    got = working_set.matmul_rate_flops_per_s("f32", 2 * mid_n**3, t)
    assert got == pytest.approx(math.sqrt(5e10 * 2e11))
    assert working_set.matmul_rate_flops_per_s("bf16", 1e9, t) == t.peak("bf16")  # no table


def _op(kind: str, flops: float = 0.0, transcendentals: float = 0.0, **attrs: object) -> Op:
    return Op(id="op0", kind=kind, step=0, inputs=(), outputs=(), flops=flops,
              transcendentals=transcendentals, bytes_read=4096, bytes_written=4096,
              attrs=dict(attrs))


def test_compute_times_use_the_measured_rates() -> None:
    t = _target()
    vector = 0.5 * 2e11
    exp = _op("stablehlo.exponential", transcendentals=1e6)
    assert working_set.compute_time_s(exp, t, vector, 1.0) == pytest.approx(1e6 / 2e9)
    tanh = _op("stablehlo.tanh", transcendentals=1e6)
    assert working_set.compute_time_s(tanh, t, vector, 1.0) == pytest.approx(1e6 / 4e9)
    erfc = _op("chlo.erfc", flops=62e6, transcendentals=1e6)  # not measured: exp's rate
    assert working_set.compute_time_s(erfc, t, vector, 0.5) == pytest.approx(
        (62e6 / vector + 1e6 / 2e9) / 0.5)
    reduce = _op("stablehlo.reduce", flops=1e6)
    assert working_set.compute_time_s(reduce, t, vector, 1.0) == pytest.approx(1e6 / 2e10)


def test_batched_dot_is_costed_per_matrix() -> None:
    t = _target()
    one = _op("stablehlo.dot_general", flops=2 * 64**3, batch=1, m=64, n=64, k=64)
    many = _op("stablehlo.dot_general", flops=16 * 2 * 64**3, batch=16, m=64, n=64, k=64)
    assert working_set.compute_time_s(one, t, 1e11, 1.0, 64 * 64) == pytest.approx(
        2 * 64**3 / 5e10)
    assert working_set.compute_time_s(many, t, 1e11, 1.0, 16 * 64 * 64) == pytest.approx(
        16 * 2 * 64**3 / 5e10)


def test_convolution_is_an_implicit_gemm_on_the_measured_units() -> None:
    # 1x16x16 output, 3x3 window, 32 -> 32 channels: F = 2 x 256 x 32 x 9 x 32 = 4.72 MFLOP,
    # the square matmul of the same flops has side (F / 2)^(1/3) = 133, between the table's
    # 64 (5e10) and 512 (2e11): rate 5e10 x 4^(log(133/64) / log(8)).
    flops = 2.0 * 256 * 32 * 9 * 32
    conv = _op("stablehlo.convolution", flops=flops, n=1, out_spatial=256, cout=32)
    side = (flops / 2) ** (1 / 3)
    rate = 5e10 * 4 ** (math.log(side / 64) / math.log(8))
    output = 256.0 * 32
    on_all = working_set.compute_time_s(conv, _target(), 1e11, 1.0, output)
    assert on_all == pytest.approx(flops / rate)
    one_unit = _target(convolution_units=1)  # XLA's CPU convolutions: one thread of two
    assert working_set.compute_time_s(conv, one_unit, 1e11, 1.0, output) == pytest.approx(
        2 * flops / rate)
    dot = _op("stablehlo.dot_general", flops=flops, batch=1, m=256, n=32, k=288)
    assert working_set.compute_time_s(dot, one_unit, 1e11, 1.0, output) == pytest.approx(
        on_all)  # matmuls keep every unit


def test_op_cost_of_a_lowered_exp() -> None:
    t = _target()
    n = 8192
    program = lower(jnp.exp, jax.ShapeDtypeStruct((n,), jnp.float32))
    (op,) = [o for o in program.ops if o.kind == "stablehlo.exponential"]
    cost = op_cost(op, program, t, ["dram"], ["dram"])
    # Working set 64 KiB: l1 (its centre is 22.6 KiB, l2's 362 KiB: interpolated between them);
    # the compute (8192 exps at 2e9/s on both units) is far above the memory time.
    assert compute_time_s(op, t) == pytest.approx(n / 2e9)
    assert cost.time_s == pytest.approx(n / 2e9 + 1e-6)
    assert cost.bytes_by_tier == {"dram": 2 * 4 * n}
