"""The Chrome trace-event JSON of a plan's predicted timeline."""

from __future__ import annotations

import json

import pytest

from tests.tiermap.tiermap_fakes import fake_plan
from tiermap.costmodel.evaluate import plan_step_times_s
from tiermap.trace import trace_events, trace_json


def _events(kind: str, cat: str | None = None) -> list[dict]:
    events = trace_events(fake_plan())["traceEvents"]
    return [e for e in events if e["ph"] == kind and (cat is None or e.get("cat") == cat)]


def test_trace_is_chrome_trace_event_json() -> None:
    doc = json.loads(trace_json(fake_plan()))
    assert isinstance(doc["traceEvents"], list)
    for e in doc["traceEvents"]:
        assert e["ph"] in {"X", "M", "C"}
        assert isinstance(e["pid"], int) and isinstance(e["name"], str)
        if e["ph"] == "X":
            assert {"ts", "dur", "tid", "cat"} <= e.keys()
            assert e["dur"] >= 0 and e["ts"] >= 0


def test_ops_sit_on_one_track_back_to_back_by_step_time() -> None:
    ops = _events("X", "op")
    assert [e["args"]["id"] for e in ops] == ["op0", "op1", "op2", "op3"]
    assert len({e["tid"] for e in ops}) == 1
    steps_us = [t * 1e6 for t in plan_step_times_s(fake_plan())]
    starts = [e["ts"] for e in ops]
    assert starts[0] == 0
    for i in range(1, len(ops)):
        assert starts[i] == pytest.approx(starts[i - 1] + steps_us[i - 1])
        assert starts[i] >= starts[i - 1] + ops[i - 1]["dur"] - 1e-9
    assert ops[1]["args"]["fusion_group"] == "fuse0"


def test_transfers_sit_on_a_track_per_link_and_last_bytes_over_bandwidth() -> None:
    (x,) = _events("X", "transfer")
    assert x["args"] == {"tensor": "t2", "src": "hbm", "dst": "ddr", "bytes": 262144,
                         "start_step": 1, "end_step": 1}
    assert x["dur"] == pytest.approx(262144 / 1.0e11 * 1e6)
    names = {e["tid"]: e["args"]["name"] for e in _events("M") if e["name"] == "thread_name"}
    assert names[x["tid"]] == "link ddr↔hbm"
    assert x["tid"] != _events("X", "op")[0]["tid"]


def test_counters_track_resident_bytes_per_tier() -> None:
    counters = [e for e in _events("C") if e["name"] == "ddr resident bytes"]
    assert [c["args"]["bytes"] for c in counters] == [4 << 20, 256 * 1024, 0]
