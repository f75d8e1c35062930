"""Loops planned as steady states: each `while` body planned once, the loop priced around it.

`plan_with_loops` cuts every top-level `while` with a recognisable body out as a program of its
own (tiermap/ir/loops.py), pairs attention split across jax.grad's two scans
(tiermap/loop_pairing.py), and plans each body with the whole pipeline: schedule, liveness,
fusion, tiling, attention recognition, placement and verification all work inside the body, and
a loop inside the body is planned the same way, one level down. The enclosing program then
keeps the `while` as one op:

    compute     = trips × iteration_s,   iteration_s = body_time_s + back_edge_s
    traffic     = the op's operands and results: each xs / ys stack trips × its slices (slice by
                  slice), each carry, invariant and the counter once in (and a carry's result
                  once out)
    op time     = max(compute, traffic / the bandwidth of the tiers they live in) + overhead

- `body_time_s`: the body plan's predicted time (one iteration, its own transfers included).
- Streams: an `xs` slice the body reads in another tier than its stack's (or a `ys` slice it
  writes) moves during the iteration before (double buffering): the roofline's max overlaps
  the stacks' traffic with the iterations, and the second buffer is counted in the body tier's
  capacity. A stack in the body's own tier is read in place. `stream_s` shows the per-iteration
  link time.
- `back_edge_s`: a carry whose body output sits in another tier than the next iteration reads it
  from moves across the back edge, not overlapped.

So the loop's price does not depend on where the enclosing plan keeps its operands: the
enclosing placement sees that as the op's traffic, like any op's. The lower bound of the loop
is trips × the body's lower bound.

Capacity: while the loop runs, a tier holds the enclosing plan's tensors at the loop's step plus
the loop's `reserved_bytes` (the body's peak less the loop operands it uses in place, plus the
second buffers), and placement leaves that room at the loop's step (`LOOP_RESERVED_ATTR`). What
the body uses in place depends on the enclosing plan, so the enclosing program is planned in up
to `MAX_ROUNDS` rounds: first leaving each body the most it can need (its whole peak and a second
buffer for every slice), then the reserve that plan showed it needs; a round is valid when every
body's need fits what its round left it, and the best valid round is kept. A body that does not
fit beside its enclosing plan is planned again with what that plan leaves of each tier.
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
from tiermap.errors import InfeasiblePlacementError
from tiermap.hardware.target import Target
from tiermap.ir.loops import LoopBody, loop_body
from tiermap.ir.plan import LoopPlan, Plan, TensorPlan, occupancy_bytes
from tiermap.ir.program import Op, Program
from tiermap.loop_pairing import pair_loops

# Rounds of planning the enclosing program with the loops' reserves (module docstring); a
# round whose body had to be planned again is followed by one more.
MAX_ROUNDS = 2

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
               target: Target, notes: tuple[str, ...] = (), aliased: bool = False) -> LoopPlan:
    """The loop's record: its time, the bytes the `while` op moves of each operand and result,
    and its reserve, given where the enclosing plan holds its operands (`outer`; None: not yet
    known, so the reserve assumes the body uses none of them in place and streams every slice).

    The time (trips × (body + back edge)) does not depend on `outer`; only the reserve does."""
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

    stream_s = back_edge_s = 0.0
    double_buffer: dict[str, int] = {}
    in_place = aliased
    aliased_ids: set[str] = set()  # body tensors that are the enclosing plan's buffers
    operand_bytes: dict[int, int] = {}
    result_bytes: dict[int, int] = {}

    def nbytes_of(vid: str) -> int:
        return body.program.values[vid].nbytes

    def stream(vid: str, inner: str | None, outer_tier: str | None, inbound: bool) -> None:
        """A slice moved between its stack's tier and the body's each iteration, into a second
        buffer (double buffering); read in place when the two are the same tier."""
        nonlocal stream_s
        if (tiers is not None and outer_tier == inner) or (tiers is None and in_place):
            aliased_ids.add(vid)
            return
        if inner is not None:
            double_buffer[inner] = double_buffer.get(inner, 0) + nbytes_of(vid)
        if tiers is not None:
            stream_s += (move_s(nbytes_of(vid), outer_tier, inner) if inbound
                         else move_s(nbytes_of(vid), inner, outer_tier))

    for j, role in enumerate(body.roles):
        outer_in = tiers.operand[j] if tiers else None
        outer_out = tiers.result[j] if tiers else None
        if role == "xs":
            slices = [vid for vid, k in body.slice_inputs.items() if k == j]
            operand_bytes[j] = (0 if j in body.recomputed_stacks
                                else body.trips * sum(nbytes_of(v) for v in slices))
            for vid in slices:
                stream(vid, first_tier(vid), outer_in, inbound=True)
        elif role == "ys":
            vid = body.operand_outputs[j]
            result_bytes[j] = 0 if j in body.recomputed_stacks else body.trips * nbytes_of(vid)
            stream(vid, end_tier(vid), outer_out, inbound=False)
        else:
            vin = body.operand_inputs[j]
            operand_bytes[j] = nbytes_of(vin)  # moved in before the first iteration
            if in_place or (tiers is not None and outer_in == first_tier(vin)):
                aliased_ids.add(vin)
            vout = body.operand_outputs.get(j)
            if vout is not None:
                result_bytes[j] = nbytes_of(vout)  # moved out after the last
                out_tier = end_tier(vout)
                back_edge_s += move_s(nbytes_of(vout), out_tier, first_tier(vin))
                if in_place or (tiers is not None and outer_out == out_tier):
                    aliased_ids.add(vout)
    for vid in body.captured:
        if in_place or (tiers is not None and tiers.captured.get(vid) == first_tier(vid)):
            aliased_ids.add(vid)
    reserved = reserved_bytes(body_plan, aliased_ids, double_buffer)
    iteration_s = body_plan.predicted_time_s + back_edge_s
    time_s = body.trips * iteration_s
    return LoopPlan(
        op_id=op.id, trips=body.trips, static_trips=body.static_trips, roles=body.roles,
        operand_inputs=dict(body.operand_inputs), operand_outputs=dict(body.operand_outputs),
        body=body_plan, body_time_s=body_plan.predicted_time_s, stream_s=stream_s,
        back_edge_s=back_edge_s, iteration_s=iteration_s, prologue_s=0.0, epilogue_s=0.0,
        time_s=time_s, lower_bound_s=body.trips * body_plan.lower_bound_s,
        reserved_bytes=reserved, double_buffer_bytes=double_buffer,
        source_op_ids=dict(body.source_op_ids), notes=notes, operand_bytes=operand_bytes,
        result_bytes=result_bytes)


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
            reads = [(loop.operand_bytes or {}).get(j, 0) for j in range(len(op.inputs))]
            writes = [(loop.result_bytes or {}).get(j, 0) for j in range(len(op.outputs))]
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


def _covers(priced: LoopPlan, need: LoopPlan) -> bool:
    """Whether the reserve the enclosing plan left (`priced`) holds what the body needs."""
    return all(int(priced.reserved_bytes.get(t, 0)) >= int(n)
               for t, n in need.reserved_bytes.items())


def _at_least(loop: LoopPlan, reserve: Mapping[str, int]) -> LoopPlan:
    """`loop` reserving at least `reserve` (what earlier rounds reserved), so that reserves only
    grow from round to round (a larger reserve than the body needs is still a valid one)."""
    merged = {t: max(int(loop.reserved_bytes.get(t, 0)), int(reserve.get(t, 0)))
              for t in sorted(set(loop.reserved_bytes) | set(reserve))}
    return replace(loop, reserved_bytes=merged)


def plan_with_loops(program: Program, target: Target, plan_flat: FlatPlanFn, plan_body: PlanFn,
                    assumed_trips: int = 1, bodies: Mapping[str, LoopBody] | None = None,
                    pair_attention: bool = True) -> Plan:
    """Plan `program` with its loops planned as steady states (module docstring).

    `plan_flat(program, planned_on, target)` plans a program whose loops are priced ops on
    `planned_on` (the target less the loops' room, or the target itself) and returns a plan of
    `target`; `plan_body` plans a loop body (and handles the loops inside it); `bodies`: the
    program's `loop_bodies`, when the caller has them; `pair_attention`: pair attention split
    across two loops (tiermap/loop_pairing.py). Returns the enclosing plan with
    `Plan.loops` set.

    Raises:
        InfeasiblePlacementError: a loop's body does not fit beside the enclosing plan.
    """
    if bodies is None:
        bodies = loop_bodies(program, assumed_trips)
    if not bodies:
        return plan_flat(program, target, target)
    program, bodies, pairing_notes = pair_loops(program, bodies, target, pair_attention)
    ops = {op.id: op for op in program.ops}
    body_plans = {oid: plan_body(b.program, target) for oid, b in bodies.items()}
    notes: dict[str, list[str]] = {oid: [] for oid in bodies}
    for oid, b in bodies.items():
        if not b.static_trips:
            notes[oid].append(f"{oid}: the loop's trip count is not static; planned for "
                              f"{b.trips} trips (the assumed_trip_count option)")
    # Round 1 leaves each body its whole peak and a second buffer for every slice (the most it
    # can need); each later round the reserve the last enclosing plan showed it needs. A round
    # is valid when every loop's need fits what its enclosing plan left it; the best valid
    # round is kept.
    loops = {oid: price_loop(ops[oid], b, body_plans[oid], None, target)
             for oid, b in bodies.items()}
    best: tuple[Plan, dict[str, LoopPlan]] | None = None
    replanned: set[str] = set()
    round_index = 0
    while round_index < MAX_ROUNDS + len(replanned):
        try:
            outer = plan_flat(_priced(program, loops), target, target)
        except InfeasiblePlacementError:
            if round_index == 0:  # the most a body can need does not fit: try what it needs
                loops = {oid: price_loop(ops[oid], b, body_plans[oid], None, target, aliased=True)
                         for oid, b in bodies.items()}
                round_index += 1
                continue
            raise
        round_index += 1
        fresh = {oid: price_loop(ops[oid], b, body_plans[oid], outer, target)
                 for oid, b in bodies.items()}
        replanned_now = False
        for oid, b in bodies.items():
            step = ops[oid].step
            excess = over_capacity(_at_least(fresh[oid], loops[oid].reserved_bytes), outer, step)
            if excess and oid not in replanned:
                # The enclosing plan leaves the body too little: plan it into what is left.
                replanned.add(oid)
                body_plans[oid] = plan_body(b.program, _left_for_body(target, outer, step,
                                                                      fresh[oid]))
                notes[oid].append(
                    f"{oid}: body planned again with what the enclosing plan leaves of "
                    + ", ".join(f"{t} ({n} bytes over)" for t, n in sorted(excess.items())))
                fresh[oid] = price_loop(ops[oid], b, body_plans[oid], outer, target)
                replanned_now = True
        # A body planned again has another price than the enclosing plan charged: not valid.
        valid = not replanned_now and all(_covers(loops[oid], fresh[oid]) for oid in bodies)
        if valid:
            kept = {oid: replace(fresh[oid], reserved_bytes=dict(loops[oid].reserved_bytes))
                    for oid in bodies}
            if best is None or outer.predicted_time_s < best[0].predicted_time_s:
                best = (outer, kept)
            if all(_covers(fresh[oid], loops[oid]) for oid in bodies):
                break  # the reserve is exactly what the body needs: nothing to tighten
        loops = fresh if valid else {oid: _at_least(fresh[oid], loops[oid].reserved_bytes)
                                     for oid in bodies}
    if best is None:
        what = "; ".join(f"{oid}: " + ", ".join(
            f"{t} {n} B" for t, n in sorted(loops[oid].reserved_bytes.items()) if n)
            for oid in bodies)
        raise InfeasiblePlacementError(
            f"the loops of '{program.name}' do not fit beside the rest of the program (they "
            f"need {what}); fix: a target with more memory in those tiers, or a smaller body "
            "(fewer tokens per iteration)")
    outer, kept = best
    final = []
    for oid in bodies:
        loop = replace(kept[oid], notes=tuple(notes[oid]))
        excess = over_capacity(loop, outer, ops[oid].step)
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
