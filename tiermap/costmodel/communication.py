"""The communication of a sharded plan: collectives on the interconnect, overlapped with compute.

See tiermap/ir/sharding.py for the two-stream schedule this module computes, and
tiermap/hardware/interconnect.py for the price of one collective.
"""

from __future__ import annotations

from collections.abc import Sequence

from tiermap.errors import ChoiceError
from tiermap.hardware.interconnect import collective_time_s
from tiermap.hardware.target import Target
from tiermap.ir.program import Program
from tiermap.ir.sharding import CollectivePlan, ShardingPlan


def check_devices(program: Program, target: Target) -> None:
    """A partitioned program needs a target with as many devices; raises ChoiceError if not."""
    if program.num_devices <= 1 or program.num_devices == target.num_devices:
        return
    raise ChoiceError(
        f"program '{program.name}' is partitioned over {program.num_devices} devices, but target "
        f"'{target.name}' has {target.num_devices}; fix: plan it for a target with "
        f"{program.num_devices} devices (built-ins: dgx-h100, tpu-v5e-8, sn40l-node) or give the "
        "target file [devices] count = " + str(program.num_devices) + " and an [interconnect]")


def _overlap(busy: Sequence[tuple[float, float]], start_s: float, end_s: float) -> float:
    return sum(max(0.0, min(b, end_s) - max(a, start_s)) for a, b in busy)


def communication_plan(program: Program, op_time_s: Sequence[float],
                       target: Target) -> ShardingPlan:
    """Schedule the per-device program's ops (`op_time_s[step]`: each op's planned time) on a
    compute stream and its collectives on a communication stream (tiermap/ir/sharding.py)."""
    check_devices(program, target)
    ic = target.interconnect
    if ic is None:
        raise ChoiceError(f"target '{target.name}' has no [interconnect]; a sharded plan needs "
                          "one (see docs/architecture.md, 'Multi-chip targets')")
    ready: dict[str, float] = {vid: 0.0 for vid in program.inputs}
    compute_free = comm_free = 0.0
    busy: list[tuple[float, float]] = []
    pending: list[tuple[str, str, int, int, int, float, float, float, float]] = []
    compute_s = comm_s = 0.0
    for op in program.ops:
        start = max((ready.get(v, 0.0) for v in op.inputs), default=0.0)
        if "collective" in op.attrs:
            kind = str(op.attrs["collective"])
            priced = collective_time_s(kind, int(op.attrs["payload_bytes"]),
                                       int(op.attrs["group_size"]), ic)
            duration = max(priced.time_s, op_time_s[op.step])
            begin = max(start, comm_free)
            comm_free = end = begin + duration
            comm_s += duration
            pending.append((op.id, kind, priced.group_size, int(op.attrs.get("num_groups", 1)),
                            priced.payload_bytes, priced.wire_bytes, duration, begin, end))
        else:
            begin = max(start, compute_free)
            compute_free = end = begin + op_time_s[op.step]
            compute_s += op_time_s[op.step]
            if end > begin:
                busy.append((begin, end))
        for v in op.outputs:
            ready[v] = end
    collectives = tuple(
        CollectivePlan(op_id=i, kind=k, group_size=g, num_groups=n, payload_bytes=p,
                       wire_bytes=w, time_s=t, start_s=b, end_s=e,
                       hidden_s=_overlap(busy, b, e))
        for i, k, g, n, p, w, t, b, e in pending)
    step_s = max(compute_free, comm_free)
    return ShardingPlan(
        num_devices=program.num_devices, interconnect=ic.name or ic.topology,
        topology=ic.topology, input_shardings=program.input_shardings,
        output_shardings=program.output_shardings,
        argument_bytes=sum(program.values[v].nbytes for v in program.inputs),
        output_bytes=sum(program.values[v].nbytes for v in program.outputs),
        collectives=collectives, compute_s=compute_s, comm_s=comm_s,
        exposed_comm_s=max(0.0, step_s - compute_s), step_time_s=step_s)
