"""The optional [compute] keys of calibrated CPU targets: strict loading and round trips."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tiermap.errors import HardwareSpecError
from tiermap.hardware import dumps_target, load_target, loads_target


def _calibrated_text() -> str:
    t = load_target("cpu")
    tiers = list(t.tiers)
    tiers[-1] = replace(tiers[-1], copy_bytes_per_s=3e10, first_touch_bytes_per_s=5e9,
                        first_touch_min_bytes=32 * 2**20)
    t = replace(t, tiers=tuple(tiers), working_set_tiers=True, reduce_flops_per_s=3e10,
                transcendental_per_s={"exponential": 4.7e9, "erf": 3.9e9}, convolution_units=1,
                matmul_flops_per_s={"f32": ((64, 3e10), (512, 3e11)), "bf16": ((64, 1e10),)})
    return dumps_target(t)


def test_calibrated_keys_round_trip() -> None:
    text = _calibrated_text()
    target = loads_target(text)
    assert target.working_set_tiers
    assert target.matmul_flops_per_s["f32"] == ((64, 3e10), (512, 3e11))
    assert target.transcendental_per_s == {"exponential": 4.7e9, "erf": 3.9e9}
    assert target.tiers[-1].first_touch_min_bytes == 32 * 2**20
    assert target.convolution_units == 1
    assert loads_target(dumps_target(target)) == target
    assert "[compute.matmul_flops_per_s]" in text


def test_old_files_load_without_them() -> None:
    cpu = load_target("cpu")
    assert not cpu.working_set_tiers and not cpu.matmul_flops_per_s
    assert cpu.convolution_units == 0
    assert all(t.copy_bytes_per_s is None for t in cpu.tiers)


def test_bad_calibrated_keys_are_all_reported() -> None:
    text = (_calibrated_text()
            .replace("reduce_flops_per_s = 3e+10", "reduce_flops_per_s = -1")
            .replace("f32 = [[64, 3e+10], [512, 3e+11]]", "f32 = [[512, 3e+11], [64, 3e+10]]")
            .replace("bf16 = [[64, 1e+10]]", "bf17 = [[64, 1e+10]]")
            .replace("erf = 3.9e+09", 'erf = "fast"')
            .replace("working_set_tiers = true", "working_set_tiers = 1")
            .replace("convolution_units = 1", "convolution_units = 1.5"))
    with pytest.raises(HardwareSpecError) as info:
        loads_target(text)
    message = str(info.value)
    for key in ("compute.reduce_flops_per_s", "compute.matmul_flops_per_s.f32",
                "compute.matmul_flops_per_s.bf17", "compute.transcendental_per_s.erf",
                "compute.working_set_tiers", "compute.convolution_units"):
        assert key in message
