"""benchmarks/gpu_kernels.py without a GPU: its dry run prints the h100 predictions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import jax
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_kernels", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_kernels"] = module
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_a_prediction_per_kernel(bench: ModuleType,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--dry-run", "--small"]) == 0
    out = capsys.readouterr().out
    assert "target h100" in out and "dry run: predictions only" in out
    lines = [line for line in out.splitlines() if line.split()
             and line.split()[0] in ("matmul", "elementwise", "reduction", "attention")]
    assert len(lines) == len(bench.kernels(small=True)) == 11
    assert {line.split()[0] for line in lines} == {"matmul", "elementwise", "reduction",
                                                   "attention"}
    for line in lines:  # a predicted time; nothing measured
        assert ("µs" in line or "ms" in line) and line.rstrip().endswith("-")


def test_predictions_follow_the_roofline(bench: ModuleType) -> None:
    from tiermap.hardware import load_target

    h100 = load_target("h100")
    by_name = {k.name: k for k in bench.kernels()}
    big, _ = bench.predict(by_name["bf16 8192^3"], h100)
    # 2 x 8192^3 flops at the bf16 peak, plus one op overhead
    assert big == pytest.approx(2 * 8192**3 / h100.peak("bf16") + h100.op_overhead_s,
                                rel=1e-6)
    add, _ = bench.predict(by_name["add bf16 2^28"], h100)
    hbm = h100.main_tier
    assert add == pytest.approx(2 * 2**29 / hbm.read_bytes_per_s + 2**29 / hbm.write_bytes_per_s
                                + h100.op_overhead_s, rel=1e-6)
    unfused, planned = bench.predict(by_name["einsum bf16 4x16x4096x64"], h100)
    assert planned is not None and planned < unfused  # the fused plan moves no score matrix


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="a GPU is present")
def test_without_a_gpu_it_asks_for_dry_run(bench: ModuleType,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--small"]) == 2
    assert "use --dry-run" in capsys.readouterr().err
