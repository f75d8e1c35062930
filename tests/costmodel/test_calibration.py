"""Tests for `tiermap calibrate`'s measurement module (quick mode: a few seconds)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tiermap.costmodel.calibration import (
    CacheLevel,
    calibrate,
    count_cpus,
    parse_size_bytes,
    read_cache_levels,
    target_to_toml,
)
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
    assert "peak FLOP/s (f32)" in labels and "bandwidth of caches and DRAM (working-set sweeps)" in labels


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
