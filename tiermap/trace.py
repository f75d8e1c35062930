"""The predicted timeline of a plan as Chrome trace-event JSON (chrome://tracing, ui.perfetto.dev).

One process, "tiermap: PROGRAM on TARGET". Track "ops" has one complete ("X") event per op at its
step's start, lasting the op's predicted time; steps follow each other, each lasting its step time
(the op, or the transfers sharing a link at that step if they take longer). Each link between
two tiers has its own track, where every transfer is an "X" event lasting bytes / link bandwidth,
starting when its window of steps starts (or when the link is free, transfers on one link queue).
Counter ("C") events give the bytes resident in each tier at every step. Times are microseconds,
as the format asks.

Loops (`Plan.loops`) are shown as loops: the `while` op is one event on "ops" (its args give the
trip count and the iteration time), and a track per loop, "loop OP (N trips)", holds its body's
ops inside it, one iteration after another, each starting at the loop's start plus i × (the
op's time / trips) with the body's own step times; by default only the first (steady-state)
iteration is expanded, `iterations="all"` expands every one. Nested loops get their own tracks
below, the same way.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tiermap.costmodel.evaluate import plan_step_times_s as step_times_s
from tiermap.costmodel.roofline import transfer_time_s
from tiermap.errors import ChoiceError
from tiermap.ir.plan import occupancy_bytes

if TYPE_CHECKING:
    from tiermap.ir.plan import Plan

_US_PER_S = 1e6
_PID = 1
_OPS_TID = 1


def _link_name(src: str, dst: str) -> str:
    a, b = sorted((src, dst))
    return f"link {a}↔{b}"


def _loop_events(plan: Plan, start_s: list[float], iterations: str, tids: list[int],
                 events: list[dict[str, Any]], prefix: str = "") -> None:
    """Events of the loops of `plan` (module docstring); `tids` hands out track ids."""
    by_id = {o.id: o for o in plan.ops}
    for loop in plan.loops:
        op = by_id.get(loop.op_id)
        if op is None or not 0 <= op.step < plan.num_steps:
            continue
        tid = tids[0]
        tids[0] += 1
        label = f"loop {prefix}{loop.op_id} ({loop.trips} trips)"
        events.append({"ph": "M", "name": "thread_name", "pid": _PID, "tid": tid,
                       "args": {"name": label}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": _PID, "tid": tid,
                       "args": {"sort_index": tid}})
        body = loop.body
        body_steps = step_times_s(body)
        per_iteration_s = op.predicted_time_s / max(loop.trips, 1)
        shown = range(loop.trips if iterations == "all" else min(loop.trips, 1))
        for i in shown:
            t0 = start_s[op.step] + i * per_iteration_s
            body_start = [t0]
            for dt in body_steps:
                body_start.append(body_start[-1] + dt)
            for bop in sorted(body.ops, key=lambda o: (o.step, o.id)):
                if not 0 <= bop.step < body.num_steps:
                    continue
                events.append({
                    "ph": "X", "name": bop.kind.split(".", 1)[-1], "cat": "loop body",
                    "pid": _PID, "tid": tid, "ts": body_start[bop.step] * _US_PER_S,
                    "dur": bop.predicted_time_s * _US_PER_S,
                    "args": {"id": bop.id, "loop": loop.op_id, "iteration": i,
                             "source_op": loop.source_op_ids.get(bop.id, ""),
                             "fusion_group": bop.fusion_group or "",
                             "predicted_time_s": bop.predicted_time_s}})
            if body.loops:
                _loop_events(body, body_start, iterations, tids, events,
                             f"{prefix}{loop.op_id}/")


def trace_events(plan: Plan, iterations: str = "first") -> dict[str, Any]:
    """The plan's predicted timeline as `{"traceEvents": [...], "displayTimeUnit": "ns", ...}`;
    `iterations`: "first" (a loop's first iteration expanded) or "all"."""
    if iterations not in ("first", "all"):
        raise ChoiceError(f"iterations must be 'first' or 'all', not {iterations!r}")
    step_s = step_times_s(plan)
    start_s = [0.0] * (plan.num_steps + 1)
    for s, dt in enumerate(step_s):
        start_s[s + 1] = start_s[s] + dt
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": _PID, "tid": 0,
         "args": {"name": f"tiermap: {plan.program_name} on {plan.target.name} "
                          f"({plan.strategy})"}},
        {"ph": "M", "name": "thread_name", "pid": _PID, "tid": _OPS_TID, "args": {"name": "ops"}},
        {"ph": "M", "name": "thread_sort_index", "pid": _PID, "tid": _OPS_TID,
         "args": {"sort_index": 0}},
    ]
    loops = {loop.op_id: loop for loop in plan.loops}
    for op in sorted(plan.ops, key=lambda o: (o.step, o.id)):
        if not 0 <= op.step < plan.num_steps:
            continue
        args: dict[str, Any] = {"id": op.id, "step": op.step, "flops": op.flops,
                                "bytes_by_tier": dict(op.bytes_by_tier),
                                "predicted_time_s": op.predicted_time_s}
        if op.fusion_group:
            args["fusion_group"] = op.fusion_group
        if op.id in loops:
            loop = loops[op.id]
            args.update(trips=loop.trips, iteration_s=loop.iteration_s,
                        loop_time_s=loop.time_s)
        events.append({
            "ph": "X", "name": op.kind.split(".", 1)[-1], "cat": "op", "pid": _PID,
            "tid": _OPS_TID, "ts": start_s[op.step] * _US_PER_S,
            "dur": op.predicted_time_s * _US_PER_S, "args": args,
        })
    link_tid: dict[str, int] = {}
    link_free_s: dict[str, float] = {}
    for x in sorted(plan.transfers, key=lambda x: (x.start_step, x.end_step, x.tensor)):
        link = _link_name(x.src, x.dst)
        if link not in link_tid:
            link_tid[link] = _OPS_TID + 1 + len(link_tid)
            events.append({"ph": "M", "name": "thread_name", "pid": _PID,
                           "tid": link_tid[link], "args": {"name": link}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": _PID,
                           "tid": link_tid[link], "args": {"sort_index": len(link_tid)}})
        first = min(max(x.start_step, 0), plan.num_steps)
        begin_s = max(start_s[first], link_free_s.get(link, 0.0))
        dur_s = transfer_time_s(x.bytes, x.src, x.dst, plan.target)
        link_free_s[link] = begin_s + dur_s
        events.append({
            "ph": "X", "name": f"{x.tensor} {x.src}→{x.dst}", "cat": "transfer", "pid": _PID,
            "tid": link_tid[link], "ts": begin_s * _US_PER_S, "dur": dur_s * _US_PER_S,
            "args": {"tensor": x.tensor, "src": x.src, "dst": x.dst, "bytes": x.bytes,
                     "start_step": x.start_step, "end_step": x.end_step},
        })
    tids = [_OPS_TID + 1 + len(link_tid)]
    _loop_events(plan, start_s, iterations, tids, events)
    for tier, row in occupancy_bytes(plan).items():
        if not any(row):
            continue
        previous = None
        for s, value in enumerate(row):
            if value != previous:
                events.append({"ph": "C", "name": f"{tier} resident bytes", "pid": _PID,
                               "ts": start_s[s] * _US_PER_S, "args": {"bytes": value}})
                previous = value
    return {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {"program": plan.program_name, "target": plan.target.name,
                      "strategy": plan.strategy, "predicted_time_s": plan.predicted_time_s,
                      "timeline_s": start_s[-1]},
    }


def trace_json(plan: Plan, iterations: str = "first") -> str:
    """`trace_events(plan, iterations)` as JSON text."""
    return json.dumps(trace_events(plan, iterations))
