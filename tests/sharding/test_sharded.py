"""Sharded GPT training steps on 8 host devices: tiermap's per-device IR against XLA.

The 8-device runs happen in a subprocess (`run_8_devices.py`), so that this test process keeps
its single host device (the rest of the suite needs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "tests.sharding.run_8_devices"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("style", ["dp", "fsdp", "tp"])
def test_per_device_argument_and_output_bytes_equal_xla_memory_analysis(
        facts: dict[str, Any], style: str) -> None:
    xla, ours = facts[style]["xla"], facts[style]["tiermap"]
    assert ours["num_devices"] == 8
    assert ours["argument_bytes"] == xla["argument_bytes"]
    assert ours["output_bytes"] == xla["output_bytes"]


@pytest.mark.parametrize("style", ["dp", "fsdp", "tp"])
def test_collective_bytes_equal_the_partitioned_hlo(facts: dict[str, Any], style: str) -> None:
    xla, ours = facts[style]["xla"], facts[style]["tiermap"]
    assert xla["collective_bytes"], "the partitioned step has collectives"
    assert ours["collective_bytes"] == xla["collective_bytes"]


def test_styles_differ_as_sharding_says(facts: dict[str, Any]) -> None:
    dp, fsdp, tp = (facts[s]["tiermap"] for s in ("dp", "fsdp", "tp"))
    # FSDP holds 1/8 of every parameter: per-device arguments well under data-parallel's
    assert fsdp["argument_bytes"] * 4 < dp["argument_bytes"]
    # and the global arguments are 8x what one FSDP device holds, up to the replicated pos_emb
    assert facts["fsdp"]["global_argument_bytes"] > 6 * fsdp["argument_bytes"]
    assert "all_gather" in fsdp["collective_bytes"]
    assert set(dp["collective_bytes"]) == {"all_reduce"}
    assert "all_reduce" in tp["collective_bytes"]
    assert all(g == 8 for g in dp["collective_groups"] + tp["collective_groups"])
    assert any("devices=[" in s for s in fsdp["input_shardings"])
    assert any("devices=[" in s for s in fsdp["output_shardings"])


@pytest.mark.parametrize("style", ["dp", "fsdp", "tp"])
def test_plan_on_dgx_h100_carries_the_collectives(facts: dict[str, Any], style: str) -> None:
    planned, ours = facts[style]["plan"], facts[style]["tiermap"]
    assert planned["collective_bytes"] == facts[style]["xla"]["collective_bytes"]
    assert planned["argument_bytes"] == ours["argument_bytes"]
    assert planned["round_trips"]
    assert planned["comm_s"] > 0
    # the step with communication is at least its compute and at most compute + communication
    assert planned["compute_s"] <= planned["step_time_s"] + 1e-12
    assert planned["step_time_s"] <= planned["compute_s"] + planned["comm_s"] + 1e-12
    # per-device capacity: the placement holds one device's tensors, at least its arguments
    assert planned["peak_hbm_bytes"] >= ours["argument_bytes"]


@pytest.mark.parametrize("style", ["dp", "fsdp", "tp"])
def test_decorated_step_matches_jax_jit_with_output_shardings_kept(
        facts: dict[str, Any], style: str) -> None:
    run = facts[style]["decorated"]
    assert run["max_abs_ref"] > 0
    assert run["max_abs_diff"] <= 1e-4
    assert run["shardings_equal"]
    assert run["has_sharding_plan"]
    assert any("sharded plan" in note for note in run["notes"])
    if style == "fsdp":  # every updated parameter stays split over the devices
        assert run["sharded_outputs"] >= run["num_outputs"] - 2
    assert run["cache"][:2] == [1, 1]  # the call planned once, .lower found the plan


def test_sharded_stablehlo_reads_as_the_per_device_program(facts: dict[str, Any]) -> None:
    got, xla = facts["cli"]["mlir_program"], facts["cli"]["xla"]
    assert got["num_devices"] == 8
    assert got["argument_bytes"] == xla["argument_bytes"]
    assert got["output_bytes"] == xla["output_bytes"]
    assert got["collective_bytes"] == xla["collective_bytes"]


@pytest.mark.parametrize("source", ["mlir", "py"])
def test_cli_compiles_sharded_programs(facts: dict[str, Any], source: str) -> None:
    run, xla = facts["cli"]["cli"][source], facts["cli"]["xla"]
    assert run["exit"] == 0
    assert run["plan_collective_bytes"] == xla["collective_bytes"]
    summary = run["summary_sharding"]
    assert summary["num_devices"] == 8 and summary["argument_bytes"] == xla["argument_bytes"]
    assert {c["kind"] for c in summary["collectives"]} == set(xla["collective_bytes"])
    assert run["report_has_devices"] and run["report_lists"] == ["all_gather", "all_reduce"]


def test_shard_map_is_planned_per_device(facts: dict[str, Any]) -> None:
    """A `jax.shard_map` step: the IR holds one device's rows, its psum is an all-reduce of the
    bytes XLA's partitioned HLO moves, and the decorated step equals jax.jit's."""
    sm = facts["shard_map"]
    assert sm["num_devices"] == 8
    assert sm["input_shapes"] == [[128, 512], [512, 256]]
    assert sm["collective_bytes"] == sm["xla_collective_bytes"] == {"all_reduce": 1024}
    assert sm["plan_collective_bytes"] == {"all_reduce": 1024}
    assert sm["max_abs_diff"] <= 1e-4 and sm["shardings_equal"]
