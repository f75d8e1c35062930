"""Reports, summaries and atomic writes, on hand-built plans."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.tiermap.tiermap_fakes import MIB, fake_plan
from tiermap import Plan, formatting, report
from tiermap.costmodel.evaluate import plan_step_times_s
from tiermap.ir.plan import occupancy_bytes, usable_tier


def test_step_times_follow_the_plan_semantics() -> None:
    plan = fake_plan()
    # step 1: the op takes 0.16 µs but the 256 KiB hbm → ddr eviction takes 256 KiB / 100 GB/s
    eviction_s = 256 * 1024 / 1.0e11
    assert plan_step_times_s(plan) == pytest.approx([4.2e-5, eviction_s, 1e-8, 3.3e-7])


def test_occupancy_counts_each_resident_tensor_once_per_step() -> None:
    occ = occupancy_bytes(fake_plan())
    assert occ["ddr"] == [4 * MIB, 256 * 1024, 0, 0]
    # t0 all along, t2 at steps 0-1, t4 (256 B) at 2-3, t5 at 3; t3 is fused (never resident)
    kib256 = 256 * 1024
    assert occ["hbm"] == [2 * kib256, 2 * kib256, kib256 + 256, 2 * kib256 + 256]
    assert occ["sram"] == [0, 0, 0, 0]


def test_tier_rows_report_capacity_peak_and_traffic_time() -> None:
    rows = {r.name: r for r in report.tier_rows(fake_plan())}
    assert rows["ddr"].peak_bytes == 4 * MIB
    assert rows["ddr"].capacity_bytes == 1_649_267_441_664
    assert rows["ddr"].time_s == pytest.approx(4.45e6 / 1.0e11)
    assert rows["hbm"].traffic_bytes == pytest.approx(1.28e6)


def test_tensor_costs_rank_the_streamed_weight_first_and_skip_fused_tensors() -> None:
    costs = report.tensor_costs(fake_plan())
    assert costs[0].id == "t1"
    assert costs[0].memory_time_s == pytest.approx(4 * MIB / 1.0e11)
    assert "t3" not in {c.id for c in costs}
    evicted = next(c for c in costs if c.id == "t2")
    assert evicted.transfer_bytes == 256 * 1024
    assert evicted.tiers == ("hbm", "ddr")


def test_usable_tier_ignores_a_copy_still_in_flight() -> None:
    plan = fake_plan()
    t2 = plan.tensor("t2")
    assert usable_tier(plan, t2, 1) == "hbm"  # the ddr copy arrives after step 1


def test_plan_report_has_every_section() -> None:
    text = fake_plan().report()
    for needle in ("# tiermap plan: toy on sn40l", "## Predicted time", "naive", "greedy",
                   "mip (this plan)", "lower bound", "## Tiers", "peak occupancy",
                   "## Top 5 tensors by memory time", "`t1`", "## Fusion and tiling groups",
                   "block_rows=16", "optimal (highs, gap 0.00%", "hand-built for tests"):
        assert needle in text, needle
    assert "| naive | 90 µs | 1.96× |" in text


def test_plan_report_survives_a_json_round_trip() -> None:
    plan = fake_plan()
    again = Plan.from_json(plan.to_json())
    assert again.report() == plan.report()


def test_plan_summary_is_json_with_the_headline_numbers() -> None:
    summary = report.plan_summary(fake_plan(), {"plan": "out/plan.json"})
    text = json.dumps(summary)
    back = json.loads(text)
    assert back["schema"] == "tiermap.summary/v1"
    assert back["predicted_time_s"] == pytest.approx(4.6e-5)
    assert back["baselines"] == {"naive": 9.0e-5, "greedy": 5.0e-5}
    assert [t["name"] for t in back["tiers"]] == ["sram", "hbm", "ddr"]
    assert back["outputs"] == {"plan": "out/plan.json"}


def test_html_shows_tables_and_inline_pngs() -> None:
    page = fake_plan()._repr_html_()
    assert "<table>" in page and "tiermap plan: toy on sn40l" in page
    assert page.count('src="data:image/png;base64,') == 3
    assert "<img" not in report.plan_html(fake_plan(), plots=False)


def test_rich_summary_renders() -> None:
    from rich.console import Console

    console = Console(width=120, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(report.rich_summary(fake_plan()))
    text = console.export_text()
    assert "Predicted time" in text and "Tiers" in text and "ddr" in text


@pytest.mark.parametrize(("value", "text"), [
    (0, "0 B"), (1536, "1.50 KiB"), (64 * 2**30, "64.00 GiB"),
])
def test_fmt_bytes(value: float, text: str) -> None:
    assert formatting.fmt_bytes(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (0.0, "0 s"), (1.2e-5, "12 µs"), (0.0123, "12.3 ms"), (2.5, "2.5 s"), (None, "-"),
])
def test_fmt_time_s(value: float | None, text: str) -> None:
    assert formatting.fmt_time_s(value) == text


def test_write_atomic_replaces_whole_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "plan.json"
    formatting.write_atomic(target, "first")
    formatting.write_atomic(target, b"second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["plan.json"]
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & stat.S_IRGRP  # not mkstemp's 0600


def test_compare_table_has_a_row_per_plan() -> None:
    table = report.compare({"fast": fake_plan(), "slow": fake_plan("greedy", 2.0)})
    assert [r[0] for r in table.rows] == ["fast", "slow"]
    assert "| fast | sn40l | mip | 46 µs |" in str(table)
    assert table._repr_html_().startswith("<p><b>Plans compared</b></p><table>")
    assert [r[0] for r in report.compare([fake_plan()]).rows] == ["sn40l/mip"]


def test_residency_table_shows_where_the_largest_tensors_live() -> None:
    table = report.residency_table(fake_plan(), top_tensors=2)
    assert [r[0] for r in table.rows] == ["t1", "t2"]  # equal sizes: in order of creation
    assert table.rows[0][-1] == "ddr 100%"
    assert table.rows[0][3] == "input"


def test_tiles_table_lists_block_sizes_against_the_bound() -> None:
    (row,) = report.tiles_table(fake_plan()).rows
    assert row[:3] == ("fuse0", "softmax", "block_rows=16")
    assert row[5] == "1.04×"


def test_tier_contents_says_what_each_tier_holds() -> None:
    rows = {r[0]: r for r in report.tier_contents(fake_plan()).rows}
    assert rows["ddr"][1:4] == ("1", "1", "4.25 MiB")     # the weight t1, and t2 evicted
    assert rows["hbm"][1:3] == ("1", "3")
    assert rows["ddr"][-1].startswith("t1 f32[1024,1024]")
