"""Tests for `tiermap calibrate`'s measurement module (quick mode: a few seconds)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tiermap.costmodel.calibration import (
    CacheLevel,
    build_calibrated_target,
    calibrate,
    count_cpus,
    parse_size_bytes,
    read_cache_levels,
    target_to_toml,
)
from tiermap.costmodel.calibration_sweeps import Measurements, SweepPoint
from tiermap.hardware import Target, load_target


@pytest.fixture(scope="module")
def calibrated() -> tuple[Target, list[tuple[str, float]], float]:
    calls: list[tuple[str, float]] = []
    start_s = time.perf_counter()
    target = calibrate(lambda label, fraction: calls.append((label, fraction)), quick=True)
    return target, calls, time.perf_counter() - start_s


def test_quick_calibration_is_fast(calibrated: tuple[Target, list, float]) -> None:
    _, _, elapsed_s = calibrated
    assert elapsed_s < 20.0


def test_result_loads_back_strictly_and_equal(
    calibrated: tuple[Target, list, float], tmp_path: Path
) -> None:
    target, _, _ = calibrated
    path = tmp_path / "mine.toml"
    path.write_text(target_to_toml(target))
    assert load_target(path) == target


def test_tiers_fastest_first_and_positive(calibrated: tuple[Target, list, float]) -> None:
    target, _, _ = calibrated
    names = [t.name for t in target.tiers]
    assert names[-1] == "dram" and names[0] == "l1"
    assert all(n.startswith("l") for n in names[:-1])
    reads = [t.read_bytes_per_s for t in target.tiers]
    assert reads == sorted(reads, reverse=True)
    for tier in target.tiers:
        assert tier.capacity_bytes > 0 and tier.read_bytes_per_s > 0 and tier.write_bytes_per_s > 0
        assert tier.per_unit == (tier.name != "dram")
    capacities = [t.capacity_bytes for t in target.tiers]
    assert capacities == sorted(capacities)
    assert target.main_tier.name == "dram"


def test_compute_and_overhead(calibrated: tuple[Target, list, float]) -> None:
    target, _, _ = calibrated
    assert target.platform == "cpu"
    assert target.units >= 1
    assert target.peak_flops_per_s["f32"] > 1e8
    assert all(v > 0 for v in target.peak_flops_per_s.values())
    assert 0 <= target.op_overhead_s < 1e-3
    assert target.sources and target.description


def test_progress_goes_from_zero_to_one(calibrated: tuple[Target, list, float]) -> None:
    _, calls, _ = calibrated
    fractions = [f for _, f in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    labels = [label for label, _ in calls]
    assert "peak FLOP/s (f32)" in labels
    assert "bandwidth of caches and DRAM (working-set sweeps)" in labels


def test_parse_size_bytes() -> None:
    assert parse_size_bytes("48K") == 48 * 1024
    assert parse_size_bytes("32768K") == 32 * 2**20
    assert parse_size_bytes("1M") == 2**20
    assert parse_size_bytes("512") == 512
    with pytest.raises(ValueError):
        parse_size_bytes("lots")


def test_count_cpus() -> None:
    assert count_cpus("0") == 1
    assert count_cpus("0-1") == 2
    assert count_cpus("0-3,8,10-11") == 7


def test_read_cache_levels_from_a_fake_sysfs(tmp_path: Path) -> None:
    entries = [
        ("index0", "1", "Data", "32K", "0,8"),
        ("index1", "1", "Instruction", "32K", "0,8"),
        ("index2", "2", "Unified", "1024K", "0,8"),
        ("index3", "3", "Unified", "32768K", "0-15"),
    ]
    for folder, level, kind, size, shared in entries:
        d = tmp_path / folder
        d.mkdir()
        (d / "level").write_text(level + "\n")
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
        (d / "shared_cpu_list").write_text(shared + "\n")
    assert read_cache_levels(tmp_path) == [
        CacheLevel(1, 32 * 1024, 2, from_os=True),
        CacheLevel(2, 2**20, 2, from_os=True),
        CacheLevel(3, 32 * 2**20, 16, from_os=True),
    ]


def test_read_cache_levels_falls_back_to_defaults(tmp_path: Path) -> None:
    levels = read_cache_levels(tmp_path / "missing")
    assert [c.level for c in levels] == [1, 2, 3]
    assert not any(c.from_os for c in levels)


# --- building the target from injected measurements (no timing) ---------------------------------


def _measurements() -> Measurements:
    kib, mib = 2**10, 2**20

    def sweep(bytes_per_s_of: dict[int, float], out_of: int) -> tuple[SweepPoint, ...]:
        return tuple(SweepPoint(ws, ws, ws / bw, ws // out_of if out_of else 4)
                     for ws, bw in bytes_per_s_of.items())

    read = {16 * kib: 5e10, 32 * kib: 6e10, 1 * mib: 1e11, 2 * mib: 9e10, 8 * mib: 8e10,
            16 * mib: 7e10, 64 * mib: 3e10, 128 * mib: 3e10}
    write = {16 * kib: 4e10, 1 * mib: 5e10, 8 * mib: 3e10, 64 * mib: 5e9, 128 * mib: 5e9}
    copy = {32 * kib: 6e10, 1 * mib: 8e10, 16 * mib: 6e10, 48 * mib: 2.5e10, 128 * mib: 7e9}
    return Measurements(
        floor_s=4e-6, op_overhead_s=8e-7,
        read=sweep(read, 0), write=sweep(write, 1), copy=sweep(copy, 2),
        transcendental_per_s={"exponential": ((2**16, 2e9), (2**18, 2.2e9), (2**20, 2.4e9)),
                              "tanh": ((2**16, 3e9),)},
        exp_by_elements=((2**11, 1e9), (2**14, 1e9), (2**16, 2e9), (2**18, 2e9)),
        vector_flops_per_s=((2**16, 8e10), (2**18, 8e10)),
        reduce_flops_per_s=2.5e10,
        matmul_flops_per_s={"f32": ((32, 1e10), (256, 1.5e11), (1024, 2e11)),
                            "bf16": ((32, 5e9), (256, 1e11))},
        convolution_units=1)


def test_build_calibrated_target_from_measurements() -> None:
    caches = [CacheLevel(1, 32 * 2**10, 1, True), CacheLevel(2, 2**20, 1, True),
              CacheLevel(3, 32 * 2**20, 2, True)]
    target = build_calibrated_target(_measurements(), caches, 2, 16 * 2**30, name="t",
                                     description="d", sources=("s",))
    assert [t.name for t in target.tiers] == ["l1", "l2", "l3", "dram"]
    assert [t.capacity_bytes for t in target.tiers] == [64 * 2**10, 2 * 2**20, 32 * 2**20,
                                                        16 * 2**30]
    l1, l2, l3, dram = target.tiers
    # Medians of the points in each level; a level is never slower than the next.
    assert l2.read_bytes_per_s == 9.5e10 and l1.read_bytes_per_s == 9.5e10
    assert l3.read_bytes_per_s == 7.5e10 and dram.read_bytes_per_s == 3e10
    # Writes of 32 MiB or more land in fresh pages: first-touch rate, not dram's write rate;
    # dram (no other write points) takes l3's.
    assert dram.first_touch_bytes_per_s == 5e9 and dram.first_touch_min_bytes == 32 * 2**20
    assert dram.write_bytes_per_s == 3e10 and l3.write_bytes_per_s == 3e10
    assert l2.write_bytes_per_s == 5e10 and l1.write_bytes_per_s == 5e10
    assert dram.copy_bytes_per_s == 2.5e10
    assert target.working_set_tiers and target.peak_flops_per_s == {"f32": 2e11, "bf16": 1e11}
    assert target.matmul_flops_per_s["bf16"] == ((32, 5e9), (256, 1e11))
    # exp doubles its rate from 2^16 elements on: a grain between 2^14 and 2^15.
    assert 2**13 <= target.parallel_grain_elements <= 2**15
    assert target.transcendental_per_s["exponential"] == pytest.approx(2.2e9)
    assert target.vector_peak_fraction == pytest.approx(0.4)
    assert target.reduce_flops_per_s == pytest.approx(2.5e10)
    assert target.convolution_units == 1
    assert target.tiers == load_target_text(target).tiers


def load_target_text(target: Target) -> Target:
    from tiermap.hardware import loads_target

    return loads_target(target_to_toml(target))


def test_quick_calibration_asks_for_the_working_set_model(
    calibrated: tuple[Target, list, float]
) -> None:
    target, _, _ = calibrated
    assert target.working_set_tiers
    assert "f32" in target.matmul_flops_per_s
    assert set(target.transcendental_per_s) == {"exponential", "tanh", "erf", "log"}
    assert target.reduce_flops_per_s > 0
    assert 1 <= target.convolution_units <= target.units
    assert all(t.copy_bytes_per_s for t in target.tiers)
