"""Loops planned as steady states: each `while` body planned once, the loop priced around it.

`plan_with_loops` cuts every top-level `while` with a recognisable body out as a program of its
own (tiermap/ir/loops.py) and plans it with the whole pipeline: schedule, liveness, fusion,
tiling, attention recognition, placement and verification all work inside the body, and a loop
inside the body is planned the same way, one level down. The enclosing program then keeps the
`while` as one op whose compute time is the loop's time:

    time_s      = prologue_s + trips × iteration_s + epilogue_s
    iteration_s = max(body_time_s, stream_s) + back_edge_s

- `body_time_s`: the body plan's predicted time (one iteration, its own transfers included).
- `stream_s`: an `xs` slice the body reads in another tier than the stack's (or a `ys` slice it
  writes in another tier) is streamed: the next iteration's slice moves during this one (double
  buffering), so it costs only where the links are busier than the body; its second buffer is
  counted in the body tier's capacity.
- `back_edge_s`: a carry whose body output sits in another tier than the next iteration reads it
  from moves across the back edge, not overlapped.
- `prologue_s`: what the first iteration reads in another tier than the enclosing plan holds it
  in (carries, invariants, captures, the first slices) moves in first; `epilogue_s`: the carried
  results (and the last `ys` slices) move back to where the enclosing plan keeps them.

The lower bound of the loop is trips × the body's lower bound. Capacity: while the loop runs, a
tier holds the enclosing plan's tensors at the loop's step plus the loop's `reserved_bytes` (the
body's peak less the loop operands it uses in place, plus the second buffers). The prologue and
epilogue depend on where the enclosing plan puts the loop's operands, and the enclosing plan on
the loop's time, so the two are planned in turn until the loop's time stops changing (after
`MAX_ROUNDS` rounds a price may only rise, so the rounds end; a loop priced above what its final
tiers need keeps the higher price, the difference added to its prologue, and a note says so).
A body whose peak does not fit beside the enclosing plan is handled in two steps: first the
enclosing program is planned again leaving the bodies' whole peaks free (at every step; its
lower bound is then recomputed on the real target), then, if it still does not fit, the body is
planned again with what is left of each tier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from tiermap.costmodel.roofline import (
    LOOP_LOWER_BOUND_ATTR,
    LOOP_OPERAND_BYTES_ATTR,
    LOOP_RESERVED_ATTR,
    LOOP_RESULT_BYTES_ATTR,
    LOOP_TIME_ATTR,
    transfer_time_s,
)
from tiermap.errors import InfeasiblePlacementError, TiermapError
from tiermap.hardware.target import Target
from tiermap.ir.loops import LoopBody, loop_body
from tiermap.ir.plan import LoopPlan, Plan, TensorPlan, occupancy_bytes
from tiermap.ir.program import Op, Program
from tiermap.loop_pairing import pair_loops

# Rounds of planning the enclosing program and re-pricing its loops.
MAX_ROUNDS = 3
# Relative fall in a loop's time below which the rounds stop (the loop keeps the higher price,
# the difference in its prologue); any rise plans the enclosing program again.
TIME_TOLERANCE = 1e-3

PlanFn = Callable[[Program, Target], Plan]
# Plans a program on the first target; the plan is of the second (the first with less capacity).
FlatPlanFn = Callable[[Program, Target, Target], Plan]


@dataclass(frozen=True)
class _Tiers:
    """Where the enclosing plan holds the loop's operands and results at the loop's step."""

    operand: tuple[str | None, ...]
    result: tuple[str | None, ...]
    captured: Mapping[str, str | None]


def loop_bodies(program: Program, assumed_trips: int = 1) -> dict[str, LoopBody]:
    """The loops of `program` (top level) that are planned as steady states, by op id."""
    out = {}
    for op in program.ops:
        body = loop_body(program, op, assumed_trips)
        if body is not None and body.program.ops:
            out[op.id] = body
    return out


def _fastest(tensor: TensorPlan | None, step: int, order: Mapping[str, int]) -> str | None:
    if tensor is None:
        return None
    tiers = [r.tier for r in tensor.residency if r.from_step <= step <= r.to_step]
    return min(tiers, key=lambda t: order[t]) if tiers else None


def _tensors(plan: Plan) -> dict[str, TensorPlan]:
    return {t.id: t for t in plan.tensors}


def _outer_tiers(op: Op, body: LoopBody, outer: Plan) -> _Tiers:
    order = {t.name: i for i, t in enumerate(outer.target.tiers)}
    by_id = _tensors(outer)
    n = len(body.roles)
    return _Tiers(
        operand=tuple(_fastest(by_id.get(op.inputs[j]), op.step, order) for j in range(n)),
        result=tuple(_fastest(by_id.get(op.outputs[j]), op.step, order) for j in range(n)),
        captured={vid: _fastest(by_id.get(vid), op.step, order) for vid in body.captured})


def price_loop(op: Op, body: LoopBody, body_plan: Plan, outer: Plan | None,
               target: Target, notes: tuple[str, ...] = ()) -> LoopPlan:
    """The loop's record: its times and reserved bytes, given where the enclosing plan holds its
    operands (`outer`; None: where the body reads them, so no prologue or epilogue)."""
    bt = _tensors(body_plan)
    last = max(body_plan.num_steps - 1, 0)
    order = {t.name: i for i, t in enumerate(target.tiers)}

    def first_tier(vid: str) -> str | None:
        t = bt.get(vid)
        if t is None:
            return None
        step = max(t.producer_step, 0)
        return _fastest(t, step, order)

    def end_tier(vid: str) -> str | None:
        return _fastest(bt.get(vid), last, order)

    tiers = _outer_tiers(op, body, outer) if outer is not None else None

    def move_s(nbytes: int, src: str | None, dst: str | None) -> float:
        if src is None or dst is None or src == dst:
            return 0.0
        return transfer_time_s(nbytes, src, dst, target)

    stream_s = back_edge_s = prologue_s = epilogue_s = 0.0
    double_buffer: dict[str, int] = {}
    aliased: set[str] = set()  # body tensors that are the enclosing plan's buffers

    def stream(vid: str, inner: str | None, outer: str | None, inbound: bool) -> float:
        """A slice moved between its stack's tier (`outer`) and the body's (`inner`) each
        iteration, double-buffered; returns one move's time (0 when it is read in place)."""
        if outer == inner:
            aliased.add(vid)
            return 0.0
        nbytes = body_plan.tensor(vid).nbytes
        if inner is not None:
            double_buffer[inner] = double_buffer.get(inner, 0) + nbytes
        return move_s(nbytes, outer, inner) if inbound else move_s(nbytes, inner, outer)

    for j, role in enumerate(body.roles):
        outer_in = tiers.operand[j] if tiers else None
        outer_out = tiers.result[j] if tiers else None
        if role == "xs":
            for vid, k in body.slice_inputs.items():
                if k == j:
                    inner = first_tier(vid)
                    one_s = stream(vid, inner, outer_in if tiers else inner, inbound=True)
                    stream_s += one_s
                    prologue_s += one_s  # the first slice arrives before the first iteration
        elif role == "ys":
            vid = body.operand_outputs[j]
            inner = end_tier(vid)
            one_s = stream(vid, inner, outer_out if tiers else inner, inbound=False)
            stream_s += one_s
            epilogue_s += one_s  # the last slice leaves after the last iteration
        else:
            vin = body.operand_inputs[j]
            inner = first_tier(vin)
            src = outer_in if tiers else inner
            prologue_s += move_s(body_plan.tensor(vin).nbytes, src, inner)
            if src == inner:
                aliased.add(vin)
            vout = body.operand_outputs.get(j)
            if vout is not None:
                out_tier = end_tier(vout)
                back_edge_s += move_s(body_plan.tensor(vout).nbytes, out_tier, inner)
                dst = outer_out if tiers else out_tier
                epilogue_s += move_s(body_plan.tensor(vout).nbytes, out_tier, dst)
                if dst == out_tier:
                    aliased.add(vout)
    for vid in body.captured:
        inner = first_tier(vid)
        src = tiers.captured.get(vid) if tiers else inner
        prologue_s += move_s(body_plan.tensor(vid).nbytes, src, inner)
        if src == inner:
            aliased.add(vid)
    reserved = reserved_bytes(body_plan, aliased, double_buffer)
    stack_bytes = {}
    for j, role in enumerate(body.roles):
        if role == "xs":
            one = sum(body.program.values[v].nbytes for v, k in body.slice_inputs.items()
                      if k == j)
            stack_bytes[j] = 0 if j in body.recomputed_stacks else body.trips * one
        elif role == "ys":
            one = body.program.values[body.operand_outputs[j]].nbytes
            stack_bytes[j] = 0 if j in body.recomputed_stacks else body.trips * one
    iteration_s = body_plan.predicted_time_s + back_edge_s
    time_s = prologue_s + body.trips * iteration_s + epilogue_s
    return LoopPlan(
        op_id=op.id, trips=body.trips, static_trips=body.static_trips, roles=body.roles,
        operand_inputs=dict(body.operand_inputs), operand_outputs=dict(body.operand_outputs),
        body=body_plan, body_time_s=body_plan.predicted_time_s, stream_s=stream_s,
        back_edge_s=back_edge_s, iteration_s=iteration_s, prologue_s=prologue_s,
        epilogue_s=epilogue_s, time_s=time_s,
        lower_bound_s=body.trips * body_plan.lower_bound_s, reserved_bytes=reserved,
        double_buffer_bytes=double_buffer, source_op_ids=dict(body.source_op_ids), notes=notes,
        stack_bytes=stack_bytes)


def reserved_bytes(body_plan: Plan, aliased: set[str], double_buffer: Mapping[str, int]
                   ) -> dict[str, int]:
    """Per tier, the most the body holds at any of its steps beyond the `aliased` tensors (the
    enclosing plan's own buffers), plus the second slice buffers."""
    occ = occupancy_bytes(body_plan)
    out: dict[str, int] = {}
    for tier, per_step in occ.items():
        shared = [0] * len(per_step)
        for t in body_plan.tensors:
            if t.id not in aliased:
                continue
            for r in t.residency:
                if r.tier == tier:
                    for s in range(r.from_step, min(r.to_step, len(per_step) - 1) + 1):
                        shared[s] += t.nbytes
        peak = max((a - b for a, b in zip(per_step, shared, strict=True)), default=0)
        out[tier] = max(peak, 0) + int(double_buffer.get(tier, 0))
    for tier, nbytes in double_buffer.items():
        out.setdefault(tier, int(nbytes))
    return out


def over_capacity(loop: LoopPlan, outer: Plan, step: int) -> dict[str, int]:
    """Tier → bytes by which the enclosing plan plus the loop overflow it at the loop's step."""
    occ = occupancy_bytes(outer)
    out = {}
    for tier in outer.target.tiers:
        held = occ.get(tier.name, [0] * (step + 1))[step] if tier.name in occ else 0
        excess = held + loop.reserved_bytes.get(tier.name, 0) - tier.capacity_bytes
        if excess > 0:
            out[tier.name] = excess
    return out


def _priced(program: Program, loops: Mapping[str, LoopPlan]) -> Program:
    ops = []
    for op in program.ops:
        loop = loops.get(op.id)
        if loop is not None:
            # The loop's time holds the body's own traffic, the prologue and the epilogue; the
            # op's memory traffic is the stacks it streams, overlapped with the iterations.
            stacks = loop.stack_bytes or {}
            reads = [stacks.get(j, 0) if j < len(loop.roles) and loop.roles[j] == "xs" else 0
                     for j in range(len(op.inputs))]
            writes = [stacks.get(j, 0) if j < len(loop.roles) and loop.roles[j] == "ys" else 0
                      for j in range(len(op.outputs))]
            attrs = {**op.attrs, LOOP_TIME_ATTR: loop.time_s,
                     LOOP_LOWER_BOUND_ATTR: loop.lower_bound_s,
                     LOOP_OPERAND_BYTES_ATTR: tuple(reads), LOOP_RESULT_BYTES_ATTR: tuple(writes),
                     LOOP_RESERVED_ATTR: dict(loop.reserved_bytes)}
            op = replace(op, attrs=attrs, bytes_read=sum(reads), bytes_written=sum(writes))
        ops.append(op)
    return replace(program, ops=tuple(ops))


def _left_for_body(target: Target, outer: Plan, step: int, loop: LoopPlan) -> Target:
    """`target` with each tier's capacity less what the enclosing plan holds at `step` and the
    loop's second buffers."""
    occ = occupancy_bytes(outer)
    tiers = []
    for tier in target.tiers:
        held = occ[tier.name][step] if tier.name in occ else 0
        left = tier.capacity_bytes - held - loop.double_buffer_bytes.get(tier.name, 0)
        tiers.append(replace(tier, capacity_bytes=max(int(left), 0)))
    return replace(target, tiers=tuple(tiers))


def _padded(loop: LoopPlan, priced_s: float, notes: list[str]) -> LoopPlan:
    """`loop` priced at `priced_s` (at least its own time): the difference is added to its
    prologue, with a note, so the enclosing plan's price is what the record says."""
    if priced_s <= loop.time_s:
        return loop
    extra = priced_s - loop.time_s
    if extra > TIME_TOLERANCE * priced_s:
        notes.append(f"{loop.op_id}: priced at {priced_s:.6g} s, {extra:.3g} s above what its "
                     "final operand tiers need (the planning rounds' largest price)")
    return replace(loop, prologue_s=loop.prologue_s + extra, time_s=priced_s)


def _at_least(loop: LoopPlan, reserve: Mapping[str, int]) -> LoopPlan:
    """`loop` reserving at least `reserve` (what earlier rounds reserved), so that reserves only
    grow from round to round (a larger reserve than the body needs is still a valid one)."""
    merged = {t: max(int(loop.reserved_bytes.get(t, 0)), int(reserve.get(t, 0)))
              for t in sorted(set(loop.reserved_bytes) | set(reserve))}
    return replace(loop, reserved_bytes=merged)


def plan_with_loops(program: Program, target: Target, plan_flat: FlatPlanFn, plan_body: PlanFn,
                    assumed_trips: int = 1, bodies: Mapping[str, LoopBody] | None = None
                    ) -> Plan:
    """Plan `program` with its loops planned as steady states (module docstring).

    `plan_flat(program, planned_on, target)` plans a program whose loops are priced ops on
    `planned_on` (the target less the loops' room, or the target itself) and returns a plan of
    `target`; `plan_body` plans a loop body (and handles the loops inside it); `bodies`: the
    program's `loop_bodies`, when the caller has them. Returns the enclosing plan with
    `Plan.loops` set.

    Raises:
        InfeasiblePlacementError: a loop's body does not fit beside the enclosing plan.
    """
    if bodies is None:
        bodies = loop_bodies(program, assumed_trips)
    if not bodies:
        return plan_flat(program, target, target)
    program, bodies, pairing_notes = pair_loops(program, bodies, target)
    ops = {op.id: op for op in program.ops}
    body_plans = {oid: plan_body(b.program, target) for oid, b in bodies.items()}
    notes: dict[str, list[str]] = {oid: [] for oid in bodies}
    for oid, b in bodies.items():
        if not b.static_trips:
            notes[oid].append(f"{oid}: the loop's trip count is not static; planned for "
                              f"{b.trips} trips (the assumed_trip_count option)")
    loops = {oid: price_loop(ops[oid], b, body_plans[oid], None, target)
             for oid, b in bodies.items()}
    replanned: set[str] = set()
    for round_index in range(MAX_ROUNDS + 3):
        outer = plan_flat(_priced(program, loops), target, target)
        under = False
        for oid, b in bodies.items():
            step = ops[oid].step
            fresh = _at_least(price_loop(ops[oid], b, body_plans[oid], outer, target),
                              loops[oid].reserved_bytes)
            excess = over_capacity(fresh, outer, step)
            if excess and oid not in replanned and round_index >= MAX_ROUNDS:
                # The enclosing plan leaves too little room at the loop's step, round after
                # round: plan the body into what it leaves.
                replanned.add(oid)
                body_plans[oid] = plan_body(b.program, _left_for_body(target, outer, step, fresh))
                notes[oid].append(
                    f"{oid}: body planned again with what the enclosing plan leaves of "
                    + ", ".join(f"{t} ({n} bytes over)" for t, n in sorted(excess.items())))
                fresh = _at_least(price_loop(ops[oid], b, body_plans[oid], outer, target),
                                  loops[oid].reserved_bytes)
                under = True
            if any(fresh.reserved_bytes.get(t, 0) > loops[oid].reserved_bytes.get(t, 0)
                   for t in fresh.reserved_bytes):
                under = True  # the body needs more room than the enclosing plan left it
            priced = loops[oid].time_s
            settling = round_index >= MAX_ROUNDS  # from here on prices only rise, so rounds end
            if fresh.time_s > priced * (1.0 + 1e-12):  # the enclosing plan charged too little
                under = True
                loops[oid] = fresh
            elif fresh.time_s < priced * (1.0 - TIME_TOLERANCE) and not settling:
                under = True
                loops[oid] = fresh
            else:
                loops[oid] = _padded(fresh, priced, notes[oid])
        if not under:
            break
        if round_index == MAX_ROUNDS + 2:
            raise TiermapError(
                f"the loops of '{program.name}' did not settle in {MAX_ROUNDS + 3} planning "
                "rounds; fix: plan with fusion off or report the program")
    final = []
    for oid in bodies:
        step = ops[oid].step
        loop = replace(loops[oid], notes=tuple(notes[oid]))
        excess = over_capacity(loop, outer, step)
        if excess:
            what = ", ".join(f"{t}: {n} bytes over" for t, n in sorted(excess.items()))
            raise InfeasiblePlacementError(
                f"loop {oid} of '{program.name}' does not fit beside the rest of the program "
                f"({what}); fix: a target with more memory in those tiers, or a smaller body "
                "(fewer tokens per iteration)")
        final.append(loop)
    loop_notes = tuple(pairing_notes) + tuple(n for oid in bodies for n in notes[oid])
    loop_warnings = tuple(f"{loop.op_id}'s body: {w}" for loop in final for w in loop.body.warnings)
    return replace(outer, loops=tuple(final), notes=tuple(outer.notes) + loop_notes,
                   warnings=tuple(outer.warnings) + loop_warnings)
