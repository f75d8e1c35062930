"""benchmarks/costmodel_cpu.py's model side on a hand-made CPU target (no timing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import pytest

from tiermap.frontend.lowering import lower
from tiermap.hardware.target import Target, Tier

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "costmodel_cpu.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("costmodel_cpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["costmodel_cpu"] = module
    spec.loader.exec_module(module)
    return module


def _cpu() -> Target:
    return Target(
        name="hand-cpu", description="hand-made 2-core CPU", platform="cpu",
        peak_flops_per_s={"f32": 4e11}, units=2, op_overhead_s=1e-6,
        vector_peak_fraction=0.05, transcendental_flops=4.0, parallel_grain_elements=50_000.0,
        tiers=(Tier("l1", 98_304, 4.6e11, 4.6e11, per_unit=True),
               Tier("l2", 2_097_152, 4.4e11, 4.4e11, per_unit=True),
               Tier("l3", 33_554_432, 2.4e11, 2.4e11, per_unit=True),
               Tier("dram", 16 * 2**30, 3.5e10, 3.5e10)))


def test_spearman_with_numpy_ranks(bench: ModuleType) -> None:
    assert list(bench.ranks([3.0, 1.0, 2.0, 2.0])) == [4.0, 1.0, 2.5, 2.5]
    assert bench.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert bench.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_softmax_forms_three_kernels_and_small_ops_sit_in_cache(bench: ModuleType) -> None:
    sds = jax.ShapeDtypeStruct
    softmax = lower(lambda x: jax.nn.softmax(x, axis=-1), sds((64, 256), jnp.float32))
    pred = bench.predict(softmax, _cpu())
    assert pred.kernels == 3
    assert pred.time_s >= 3 * 1e-6
    add = lower(lambda a, b: a + b, sds((1024,), jnp.float32), sds((1024,), jnp.float32))
    small = bench.predict(add, _cpu())
    # Reads 8 KiB from l1, writes the fresh 4 KiB output to DRAM; memory-bound, one overhead.
    assert small.memory_s == pytest.approx(8192 / 4.6e11 + 4096 / 3.5e10)
    assert small.time_s == pytest.approx(small.memory_s + 1e-6)
    assert small.bound == "memory"
    halved = bench.predict(add, bench.with_write_allocate(_cpu()))
    assert halved.memory_s == pytest.approx(8192 / 4.6e11 + 4096 / 1.75e10)


def test_suite_lowers(bench: ModuleType) -> None:
    cases = bench.suite(quick=True)
    assert {c.op for c in cases} >= {"matmul", "add", "softmax", "attention"}
    for case in cases[:3]:
        assert bench.predict(lower(case.fn, *case.args), _cpu()).time_s > 0
