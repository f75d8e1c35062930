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


def _scan_plan() -> object:
    import jax
    import jax.numpy as jnp

    import tiermap

    def rnn(ws: jax.Array, x: jax.Array) -> jax.Array:
        def body(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
            return jnp.tanh(h @ w), None

        return jax.lax.scan(body, x, ws)[0]

    return tiermap.plan(rnn, jnp.ones((5, 32, 32)) * 0.05, jnp.ones((8, 32)), target="h100",
                        time_limit_s=5)


def test_loops_show_as_loops_one_iteration_or_all() -> None:
    plan = _scan_plan()
    (loop,) = plan.loops  # type: ignore[attr-defined]
    first = trace_events(plan)["traceEvents"]  # type: ignore[arg-type]
    names = [e["args"]["name"] for e in first if e["ph"] == "M" and e["name"] == "thread_name"]
    assert f"loop {loop.op_id} (5 trips)" in names
    body = [e for e in first if e.get("cat") == "loop body"]
    assert len(body) == loop.body.num_steps and {e["args"]["iteration"] for e in body} == {0}
    op = next(e for e in first if e.get("cat") == "op" and e["args"]["id"] == loop.op_id)
    assert op["args"]["trips"] == 5
    # The first iteration starts with the loop, and the body sits inside the loop's op.
    assert min(e["ts"] for e in body) == pytest.approx(op["ts"])
    assert max(e["ts"] + e["dur"] for e in body) <= op["ts"] + op["dur"] + 1e-6
    every = [e for e in trace_events(plan, "all")["traceEvents"]  # type: ignore[arg-type]
             if e.get("cat") == "loop body"]
    assert len(every) == 5 * loop.body.num_steps
    assert max(e["ts"] + e["dur"] for e in every) <= op["ts"] + op["dur"] + 1e-6
    with pytest.raises(Exception, match="first"):
        trace_events(plan, "some")  # type: ignore[arg-type]
