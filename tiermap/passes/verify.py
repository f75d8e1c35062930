"""The `verify` pass and `verify_plan`: an independent re-check of a plan.

Written apart from the placement solver (it imports no strategy): it reads only the Plan (and,
when given, the Program) and checks the semantics fixed in tiermap/ir/plan.py:

1. every materialized tensor resides somewhere at every step of its live range and nowhere outside
   it; fused (unmaterialized) tensors have no residency;
2. a tensor's intervals in one tier do not overlap;
3. each op's materialized inputs are usable at its step (resident there, not mid-transfer into
   that tier) and its outputs reside somewhere at its step; an alias op's (a reshape's) result
   resides then in a tier where its operand resides (it is the same buffer);
4. every change of tier has its move: an interval that starts after the live range starts is
   the destination of exactly one move starting there: one transfer, or chunks (transfers from
   one source, one after another) whose bytes add up to nbytes, the source holding the tensor
   from the first's start to the last's end (a program input may also be copied from step 0; a
   produced tensor is written, not moved, at its producer step, into one writable tier); nothing
   is written into a read-only tier;
5. at every step every tier's resident bytes fit its capacity;
6. read-only tiers hold only program inputs and constants; scratch tiers (per-unit, not
   persistent) hold nothing;
7. op times are at least their compute bound (flops / peak), per fusion group where fused;
8. `predicted_time_s` ≥ Σ op times, ≥ Σ over steps of max(op time, link shares), and
   ≥ `lower_bound_s`; a "mip" plan is no worse than its baselines (1e-9 relative);
9. the JSON round trip reproduces the plan;
10. loops (`Plan.loops`): each body plan passes 1-9 on its own; the `while` op's compute time is
    the loop's time, trips × iteration (+ prologue + epilogue in plans without operand bytes),
    iteration being the body's time plus the back edge, and the op's traffic its operands'
    bytes (`operand_bytes`, `result_bytes`; a plan without them: iteration ≥ the body's time
    and ≥ its streams, plus the back edge); at the loop's step every tier holds the enclosing
    plan's bytes plus the loop's reserved bytes within its capacity, and the reserve covers the
    body's peak less at most its inputs and outputs (which may be the enclosing plan's own
    buffers), plus the double buffers; carried state meets across the back edge (a carry whose
    body output sits in another tier than its input is paid for in `back_edge_s`); the lower
    bound is trips × the body's.
11. recomputations (`Plan.recomputes`): the repeated ops sit at the steps named, after the ops
    they repeat, each of the same kind with as many results, reading what its original read
    (the same tensor, still live, or the copy an earlier repeated op made of it); the last one
    writes the copy; the dropped tensor is read by no op at or after the recomputation and no
    tier holds it over `freed_steps`; the recomputation's inputs are resident at its steps (3).

Every failure raises `PassError("verify", ...)` naming the tensor, op, step, tier and numbers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from tiermap.costmodel.roofline import transfer_time_s
from tiermap.errors import PassError
from tiermap.ir.plan import LoopPlan, Plan, TensorPlan, Transfer, alias_pairs

if TYPE_CHECKING:
    from tiermap.ir.program import Program
    from tiermap.passes.base import PipelineState

REL_TOL = 1e-9
CONSTANT_KIND = "stablehlo.constant"


def _fail(message: str) -> None:
    raise PassError("verify", message)


def _close_le(a: float, b: float) -> bool:
    """a ≤ b up to the relative tolerance."""
    return a <= b + REL_TOL * max(abs(a), abs(b), 1e-300)


def _live_start(t: TensorPlan) -> int:
    return max(t.producer_step, 0)


def _rewritten(plan: Plan, program: Program) -> Program:
    """The program `plan` places when it recomputes: the one it carries, once checked to be
    `program` (what the caller planned) with the repeated ops written in."""
    mine = plan.program
    if mine is None:
        _fail(f"the plan recomputes {len(plan.recomputes)} tensor(s) but carries no program; "
              "verify it against the rewritten program (`plan.program` when planned)")
        raise AssertionError  # unreachable: _fail raises
    repeated = {oid for rc in plan.recomputes for oid in rc.op_ids}
    kept = [op for op in mine.ops if op.id not in repeated]
    if [op.kind for op in kept] != [op.kind for op in program.ops] or mine.inputs != (
            program.inputs):
        _fail(f"the plan's program is not {program.name} with its recomputations written in "
              f"({len(kept)} ops besides the repeated ones, {program.num_steps} in the program)")
    return mine


def _check_program_match(plan: Plan, program: Program) -> None:
    if plan.num_steps != program.num_steps:
        _fail(f"plan has {plan.num_steps} steps, program {program.name} has {program.num_steps}")
    for t in plan.tensors:
        if t.id not in program.values:
            _fail(f"tensor {t.id} is not a value of program {program.name}")
        first, last = program.live_range(t.id)
        if (_live_start(t), t.last_use_step) != (first, last):
            _fail(f"tensor {t.id}: plan live range [{_live_start(t)}, {t.last_use_step}] differs "
                  f"from the program's [{first}, {last}]")
        if t.nbytes != program.values[t.id].nbytes:
            _fail(f"tensor {t.id}: plan nbytes {t.nbytes} != program {program.values[t.id].nbytes}")
    listed = {t.id for t in plan.tensors}
    missing = [vid for vid in program.values if vid not in listed]
    if missing:
        _fail(f"plan lacks tensors {missing[:5]} of program {program.name}")


def _check_residency(plan: Plan) -> None:
    """(1) coverage of the live range, (2) no overlap in one tier."""
    tier_names = {t.name for t in plan.target.tiers}
    for t in plan.tensors:
        if not t.materialized:
            if t.residency:
                _fail(f"tensor {t.id} is fused (not materialized) but has residency "
                      f"{[(r.tier, r.from_step, r.to_step) for r in t.residency]}")
            continue
        first, last = _live_start(t), t.last_use_step
        if not t.residency:
            _fail(f"tensor {t.id} (shape {list(t.shape)}) is materialized but resides nowhere; "
                  f"live range [{first}, {last}]")
        covered = np.zeros(last - first + 1, dtype=bool)
        by_tier: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for r in t.residency:
            if r.tier not in tier_names:
                _fail(f"tensor {t.id} resides in unknown tier '{r.tier}'")
            if r.from_step > r.to_step:
                _fail(f"tensor {t.id}: empty interval [{r.from_step}, {r.to_step}] in {r.tier}")
            if r.from_step < first or r.to_step > last:
                _fail(f"tensor {t.id}: interval [{r.from_step}, {r.to_step}] in {r.tier} leaves "
                      f"its live range [{first}, {last}]")
            covered[r.from_step - first: r.to_step - first + 1] = True
            by_tier[r.tier].append((r.from_step, r.to_step))
        if not covered.all():
            step = first + int(np.argmin(covered))
            _fail(f"tensor {t.id} resides nowhere at step {step} (live range [{first}, {last}])")
        for tier, spans in by_tier.items():
            spans.sort()
            for (a0, a1), (b0, b1) in zip(spans, spans[1:], strict=False):
                if b0 <= a1:
                    _fail(f"tensor {t.id}: intervals [{a0}, {a1}] and [{b0}, {b1}] overlap "
                          f"in tier {tier}")


def _resident(t: TensorPlan, tier: str, step: int) -> bool:
    return any(r.tier == tier and r.from_step <= step <= r.to_step for r in t.residency)


def _first_gap(t: TensorPlan, tier: str, first: int, last: int) -> int | None:
    """The first step of [first, last] at which `t` is not resident in `tier`, else None."""
    step = first
    for r in sorted((r for r in t.residency if r.tier == tier), key=lambda r: r.from_step):
        if r.from_step <= step <= r.to_step:
            step = r.to_step + 1
        if step > last:
            return None
    return step


def _moves(plan: Plan, by_id: dict[str, TensorPlan]) -> dict[tuple[str, str, int], list[Transfer]]:
    """The transfers into each residency interval, (tensor, tier, from_step) -> in step order:
    a transfer belongs to the destination interval that holds its start step."""
    into: dict[tuple[str, str, int], list[Transfer]] = defaultdict(list)
    for x in plan.transfers:
        t = by_id.get(x.tensor)
        if t is None:
            continue
        held = [r for r in t.residency if r.tier == x.dst and r.from_step <= x.start_step
                <= r.to_step]
        from_step = max(r.from_step for r in held) if held else x.start_step
        into[(x.tensor, x.dst, from_step)].append(x)
    for xs in into.values():
        xs.sort(key=lambda x: (x.start_step, x.end_step))
    return into


def _check_move(t: TensorPlan, tier: str, from_step: int, xs: Sequence[Transfer]) -> None:
    """(4) the transfers into `t`'s interval in `tier` from `from_step` make one move."""
    where = f"tensor {t.id}: the move into {tier} at step {from_step}"
    if xs[0].start_step != from_step:
        _fail(f"{where} starts at step {xs[0].start_step}; it must start where the residency "
              "in that tier starts")
    sources = sorted({x.src for x in xs})
    if len(sources) > 1:
        _fail(f"{where} comes from {', '.join(sources)}; its chunks come from one tier")
    for prev, nxt in zip(xs, xs[1:], strict=False):
        if nxt.start_step <= prev.end_step:
            _fail(f"{where}: chunks at steps [{prev.start_step}, {prev.end_step}] and "
                  f"[{nxt.start_step}, {nxt.end_step}] overlap; they run one after another")
    moved = sum(x.bytes for x in xs)
    if moved != t.nbytes:
        _fail(f"{where} moves {moved} bytes in {len(xs)} transfer(s); the tensor has "
              f"{t.nbytes}")
    last = max(x.end_step for x in xs)
    gap = _first_gap(t, sources[0], from_step, last)
    if gap is not None:
        _fail(f"{where}: source tier {sources[0]} does not hold the tensor at step {gap}, "
              f"within the move's steps [{from_step}, {last}]")


def _check_transfers(plan: Plan, by_id: dict[str, TensorPlan],
                     moves: dict[tuple[str, str, int], list[Transfer]]) -> None:
    """(4) a move for every change of tier, consistent with residency (`moves`: `_moves`)."""
    for x in plan.transfers:
        t = by_id.get(x.tensor)
        if t is None:
            _fail(f"transfer of unknown tensor {x.tensor} ({x.src} -> {x.dst})")
            return
        where = f"transfer of {x.tensor} {x.src} -> {x.dst} at steps [{x.start_step}, {x.end_step}]"
        if not t.materialized:
            _fail(f"{where}: the tensor is fused and never reaches memory")
        if x.src == x.dst:
            _fail(f"{where}: source and destination are the same tier")
        if not 0 < x.bytes <= t.nbytes:
            _fail(f"{where}: moves {x.bytes} bytes, the tensor has {t.nbytes}")
        if x.start_step > x.end_step:
            _fail(f"{where}: starts after it ends")
        if x.start_step < _live_start(t) or x.end_step > t.last_use_step:
            _fail(f"{where}: outside the live range [{_live_start(t)}, {t.last_use_step}]")
        if plan.target.tier(x.dst).read_only:
            _fail(f"{where}: writes into read-only tier {x.dst}")
        for tier, role in ((x.src, "source"), (x.dst, "destination")):
            gap = _first_gap(t, tier, x.start_step, x.end_step)
            if gap is not None:
                _fail(f"{where}: {role} tier {tier} does not hold the tensor at step {gap}")
    into = dict(moves)  # each interval's move is taken out as it is checked
    read_only = {tier.name for tier in plan.target.tiers if tier.read_only}
    for t in plan.tensors:
        if t.producer_step >= 0:
            written = [r.tier for r in t.residency
                       if r.from_step == t.producer_step and r.tier not in read_only]
            if len(written) > 1:
                _fail(f"tensor {t.id}: resides in {', '.join(written)} from its producer step "
                      f"{t.producer_step}; an op writes its output into one tier (move it to "
                      "the others with transfers after that step)")
        for r in t.residency:
            found = into.pop((t.id, r.tier, r.from_step), [])
            if r.from_step == _live_start(t):
                # placed there at the start; only a program input (present before step 0) may
                # also be copied there from its first step
                if found and t.producer_step >= 0:
                    _fail(f"tensor {t.id}: transfer into {r.tier} at step {r.from_step}, where "
                          f"op at step {t.producer_step} writes it (it is written there, not "
                          "moved)")
                if found:
                    _check_move(t, r.tier, r.from_step, found)
                continue
            if not found:
                _fail(f"tensor {t.id}: residency in {r.tier} from step {r.from_step} needs a "
                      f"transfer into {r.tier} starting at step {r.from_step} (or chunks, the "
                      "first starting there); found none")
            _check_move(t, r.tier, r.from_step, found)
    if into:
        (tid, dst, start), xs = next(iter(into.items()))
        _fail(f"transfer of {tid} into {dst} at step {xs[0].start_step} matches no residency "
              f"interval in {dst} ({len(xs)} such transfers)")


def _usable(t: TensorPlan, step: int, into: dict[tuple[str, str, int], list[Transfer]]
            ) -> list[str]:
    """Tiers where `t` is resident at `step` and not mid-move into (a move's chunks count from
    the first's start to the last's end)."""
    tiers = []
    for r in t.residency:
        if r.from_step <= step <= r.to_step:
            xs = into.get((t.id, r.tier, r.from_step), ())
            if not (xs and xs[0].start_step <= step <= max(x.end_step for x in xs)):
                tiers.append(r.tier)
    return tiers


def _check_ops(plan: Plan, by_id: dict[str, TensorPlan],
               into: dict[tuple[str, str, int], list[Transfer]]) -> None:
    """(3) inputs usable, outputs resident, at each op's step (`into`: `_moves`)."""
    for o in plan.ops:
        for vid in o.inputs:
            t = by_id.get(vid)
            if t is None:
                _fail(f"op {o.id} (step {o.step}) reads {vid}, which the plan does not list")
                return
            if t.materialized and not _usable(t, o.step, into):
                held = [(r.tier, r.from_step, r.to_step) for r in t.residency]
                _fail(f"op {o.id} ({o.kind}) at step {o.step} reads {vid}, which is not usable "
                      f"in any tier then (residency {held}; a transfer's destination is usable "
                      "only after its end step)")
        for vid in o.outputs:
            t = by_id.get(vid)
            if t is None:
                _fail(f"op {o.id} (step {o.step}) writes {vid}, which the plan does not list")
                return
            if t.materialized and not any(r.from_step <= o.step <= r.to_step
                                          for r in t.residency):
                _fail(f"op {o.id} at step {o.step} writes {vid}, which resides nowhere then")
        for x, y in alias_pairs(o.kind, o.inputs, o.outputs):
            tx, ty = by_id[x], by_id[y]
            if not (tx.materialized and ty.materialized) or tx.nbytes != ty.nbytes:
                continue
            at_x = {r.tier for r in tx.residency if r.from_step <= o.step <= r.to_step}
            at_y = {r.tier for r in ty.residency if r.from_step <= o.step <= r.to_step}
            if not at_x & at_y:
                _fail(f"op {o.id} ({o.kind}) at step {o.step}: its result {y} resides in "
                      f"{sorted(at_y)}, its operand {x} in {sorted(at_x)}; the result is the "
                      "operand's buffer under another shape, so it must stay where the operand is"
                      " (a copy between tiers would be a transfer the op does not pay for)")


def _check_capacity_and_kinds(plan: Plan) -> None:
    """(5) capacity per tier per step, (6) read-only and scratch tiers."""
    n = plan.num_steps
    constants = {vid for o in plan.ops if o.kind == CONSTANT_KIND for vid in o.outputs}
    tiers = {t.name: t for t in plan.target.tiers}
    delta = {name: np.zeros(n + 2, dtype=np.int64) for name in tiers}
    for t in plan.tensors:
        for r in t.residency:
            tier = tiers[r.tier]
            if not tier.holds_tensors:
                _fail(f"tensor {t.id} resides in {r.tier} at steps [{r.from_step}, {r.to_step}], "
                      f"but {r.tier} is a per-unit scratchpad (fused tiles only, no residency)")
            if tier.read_only and not (t.producer_step < 0 or t.id in constants):
                _fail(f"tensor {t.id} (produced at step {t.producer_step}) resides in read-only "
                      f"tier {r.tier}; read-only tiers hold program inputs and constants only")
            delta[r.tier][r.from_step] += t.nbytes
            delta[r.tier][r.to_step + 1] -= t.nbytes
    for name, d in delta.items():
        used = np.cumsum(d[:n])
        if n and used.max() > tiers[name].capacity_bytes:
            step = int(np.argmax(used > tiers[name].capacity_bytes))
            here = sorted((t.nbytes, t.id) for t in plan.tensors
                          if _resident(t, name, step))[::-1][:3]
            _fail(f"tier {name} holds {int(used[step])} bytes at step {step}, over its capacity "
                  f"{tiers[name].capacity_bytes} by {int(used[step]) - tiers[name].capacity_bytes}"
                  f" (largest there: {[f'{tid} ({b} B)' for b, tid in here]})")


def _check_times(plan: Plan, program: Program | None) -> None:
    """(7) compute bounds, (8) time totals and baselines."""
    target = plan.target
    max_peak = max(target.peak_flops_per_s.values(), default=0.0)
    group_time: dict[str, float] = defaultdict(float)
    group_bound: dict[str, float] = defaultdict(float)
    for o in plan.ops:
        if o.predicted_time_s < 0 or not np.isfinite(o.predicted_time_s):
            _fail(f"op {o.id} at step {o.step} has predicted time {o.predicted_time_s} s")
        bound = o.flops / max_peak if max_peak > 0 else 0.0
        if program is not None and o.flops > 0:
            bound = o.flops / target.peak(program.op(o.id).dtype)
        key = o.fusion_group or o.id
        group_time[key] += o.predicted_time_s
        group_bound[key] += max(bound, o.compute_time_s)
    for key, time_s in group_time.items():
        if not _close_le(group_bound[key], time_s):
            _fail(f"{'fusion group' if key not in {o.id for o in plan.ops} else 'op'} {key}: "
                  f"predicted {time_s:.6g} s is below its compute bound {group_bound[key]:.6g} s")
    op_sum_s = float(sum(o.predicted_time_s for o in plan.ops))
    if not _close_le(op_sum_s, plan.predicted_time_s):
        _fail(f"predicted_time_s {plan.predicted_time_s:.9g} s is below the sum of op times "
              f"{op_sum_s:.9g} s")
    step_s = _step_times(plan)
    if not _close_le(float(step_s.sum()), plan.predicted_time_s):
        _fail(f"predicted_time_s {plan.predicted_time_s:.9g} s is below Σ_step max(op time, link "
              f"shares) = {float(step_s.sum()):.9g} s")
    if not _close_le(plan.lower_bound_s, plan.predicted_time_s):
        _fail(f"predicted_time_s {plan.predicted_time_s:.9g} s beats the lower bound "
              f"{plan.lower_bound_s:.9g} s, which no plan may beat")
    if plan.strategy == "mip":
        for name, base_s in plan.baselines.items():
            if not _close_le(plan.predicted_time_s, base_s):
                _fail(f"mip plan predicts {plan.predicted_time_s:.9g} s, worse than baseline "
                      f"{name} at {base_s:.9g} s")


def _step_times(plan: Plan) -> np.ndarray:
    """Per step: max(op times there, each link's transfer shares there)."""
    n = plan.num_steps
    op_s = np.zeros(n)
    for o in plan.ops:
        op_s[o.step] += o.predicted_time_s
    links: dict[frozenset[str], np.ndarray] = {}
    for x in plan.transfers:
        key = frozenset((x.src, x.dst))
        share = links.setdefault(key, np.zeros(n + 1))
        bw = plan.target.link_bytes_per_s(x.src, x.dst)
        per_step_s = x.bytes / bw / (x.end_step - x.start_step + 1)
        share[x.start_step] += per_step_s
        share[x.end_step + 1] -= per_step_s
    out = op_s
    for share in links.values():
        out = np.maximum(out, np.cumsum(share[:n]))
    return out


def _check_round_trip(plan: Plan) -> None:
    """(9) JSON round trip."""
    text = plan.to_json()
    again = Plan.from_json(text).to_json()
    if again != text:
        for i, (a, b) in enumerate(zip(text, again, strict=False)):
            if a != b:
                _fail(f"JSON round trip changes the plan near character {i}: "
                      f"{text[max(0, i - 60): i + 40]!r} vs {again[max(0, i - 60): i + 40]!r}")
        _fail(f"JSON round trip changes the plan's length: {len(text)} vs {len(again)}")


def verify_plan(plan: Plan, program: Program | None = None, bodies: bool = True) -> None:
    """Re-check `plan` against the plan semantics; raise PassError("verify", ...) on a fault.

    Args:
        plan: the plan to check.
        program: the program it places (default: `plan.program` when attached); enables the
            checks of live ranges and sizes against the program. For a plan that recomputes,
            the program as planned (before the repeated ops were written in) is accepted: the
            plan's own program is checked to be it plus the repeated ops, and used.
        bodies: also re-check each loop's body plan on its own (off where the pipeline has just
            verified them); the loop checks themselves always run.
    """
    program = program if program is not None else plan.program
    if program is not None and plan.recomputes and not program.recomputes:
        program = _rewritten(plan, program)
    if program is not None:
        _check_program_match(plan, program)
    by_id = {t.id: t for t in plan.tensors}
    if len(by_id) != len(plan.tensors):
        _fail("a tensor is listed twice in the plan")
    _check_recomputes(plan, by_id)  # first: its faults would show below as misplaced reads
    _check_residency(plan)
    moves = _moves(plan, by_id)
    _check_transfers(plan, by_id, moves)
    _check_ops(plan, by_id, moves)
    _check_capacity_and_kinds(plan)
    _check_times(plan, program)
    for loop in plan.loops:
        _check_loop(plan, loop, bodies)
    _check_round_trip(plan)


def _root(vid: str, origin: dict[str, str]) -> str:
    """The tensor that `vid` is a copy of (following copies of copies), or `vid` itself."""
    while vid in origin:
        vid = origin[vid]
    return vid


def _check_recomputes(plan: Plan, by_id: dict[str, TensorPlan]) -> None:
    ops = {o.id: o for o in plan.ops}
    origin: dict[str, str] = {}  # a repeated op's result -> the tensor it computes again
    for rc in plan.recomputes:
        if len(rc.op_ids) != len(rc.of_ops) or not rc.op_ids:
            _fail(f"recomputation of {rc.tensor}: {len(rc.op_ids)} repeated ops for "
                  f"{len(rc.of_ops)} originals")
        for k, (cid, oid) in enumerate(zip(rc.op_ids, rc.of_ops, strict=True)):
            c, o = ops.get(cid), ops.get(oid)
            if c is None or o is None:
                _fail(f"recomputation of {rc.tensor}: op {cid if c is None else oid} is not in "
                      "the plan")
                return
            if c.step != rc.step + k or o.step >= rc.step:
                _fail(f"recomputation of {rc.tensor}: {cid} at step {c.step} (expected "
                      f"{rc.step + k}) repeats {oid} at step {o.step}, not before it")
            if c.kind != o.kind or len(c.outputs) != len(o.outputs) or len(c.inputs) != len(
                    o.inputs):
                _fail(f"recomputation of {rc.tensor}: {cid} ({c.kind}) does not repeat {oid} "
                      f"({o.kind})")
            for ci, oi in zip(c.inputs, o.inputs, strict=True):
                # the same tensor, or copies of one (a recomputed tensor read again later may
                # be read from a later copy of it than the original op read)
                if _root(ci, origin) != _root(oi, origin):
                    _fail(f"recomputation of {rc.tensor}: {cid} reads {ci} where {oid} read {oi}")
            for co, oo in zip(c.outputs, o.outputs, strict=True):
                origin[co] = oo
        last = ops[rc.op_ids[-1]]
        if origin.get(rc.copy) != rc.tensor or rc.copy not in last.outputs:
            _fail(f"recomputation of {rc.tensor}: its last op {last.id} does not write the copy "
                  f"{rc.copy}")
        readers = [o.id for o in plan.ops if o.step >= rc.step and rc.tensor in o.inputs]
        if readers:
            _fail(f"recomputation of {rc.tensor}: {readers[0]} reads the dropped tensor at or "
                  f"after the recomputation (step {rc.step}); it should read {rc.copy}")
        t = by_id.get(rc.tensor)
        lo, hi = rc.freed_steps
        if t is not None and any(r.from_step <= hi and r.to_step >= lo for r in t.residency):
            _fail(f"recomputation of {rc.tensor}: a tier holds it within its freed steps "
                  f"{lo}-{hi}")


def _occupancy_at(plan: Plan, step: int) -> dict[str, int]:
    held = {t.name: 0 for t in plan.target.tiers}
    for t in plan.tensors:
        for r in t.residency:
            if r.from_step <= step <= r.to_step:
                held[r.tier] += t.nbytes
    return held


def _check_loop(plan: Plan, loop: LoopPlan, body_too: bool = True) -> None:
    """(10) one loop of the plan."""
    where = f"loop {loop.op_id}"
    op = next((o for o in plan.ops if o.id == loop.op_id), None)
    if op is None:
        _fail(f"{where}: the plan has no op {loop.op_id}")
        return
    if body_too:
        try:
            verify_plan(loop.body)
        except PassError as exc:
            _fail(f"{where}: its body plan: {exc}")
    body = loop.body
    if loop.trips < 0 or len(loop.roles) != len(set(loop.operand_inputs) | set(
            loop.operand_outputs) | {j for j, r in enumerate(loop.roles) if r == "xs"}):
        _fail(f"{where}: {len(loop.roles)} operand roles do not match its inputs and outputs")
    if not _close_le(body.predicted_time_s, loop.body_time_s) or not _close_le(
            loop.body_time_s, body.predicted_time_s):
        _fail(f"{where}: body time {loop.body_time_s} s, its plan predicts "
              f"{body.predicted_time_s} s")
    if loop.operand_bytes is None:  # written before the operands were the op's own traffic
        iteration = max(loop.body_time_s, loop.stream_s) + loop.back_edge_s
    else:
        iteration = loop.body_time_s + loop.back_edge_s
        moved = sum(op.bytes_by_tier.values())
        want_bytes = sum(loop.operand_bytes.values()) + sum((loop.result_bytes or {}).values())
        if abs(moved - want_bytes) > REL_TOL * max(want_bytes, 1) + 1.0:
            _fail(f"{where}: the op moves {moved:.0f} bytes, its operands and results "
                  f"{want_bytes} bytes")
        if loop.prologue_s or loop.epilogue_s:
            _fail(f"{where}: a prologue or epilogue beside operand bytes (the op's traffic "
                  "already moves its operands)")
    total = loop.prologue_s + loop.trips * iteration + loop.epilogue_s
    for name, got, want in (("iteration", loop.iteration_s, iteration),
                            ("time", loop.time_s, total), ("op compute", op.compute_time_s,
                                                           loop.time_s)):
        if abs(got - want) > REL_TOL * max(abs(want), 1e-30) + 1e-18:
            _fail(f"{where}: {name} {got} s, expected {want} s")
    if min(loop.prologue_s, loop.epilogue_s, loop.stream_s, loop.back_edge_s) < 0:
        _fail(f"{where}: a negative time among prologue, epilogue, stream and back edge")
    if not _close_le(loop.trips * body.lower_bound_s, loop.lower_bound_s) or not _close_le(
            loop.lower_bound_s, loop.trips * body.lower_bound_s):
        _fail(f"{where}: lower bound {loop.lower_bound_s} s, not trips × the body's")
    # Carried state across the back edge.
    by_id = {t.id: t for t in body.tensors}
    last = max(body.num_steps - 1, 0)
    need_s = 0.0
    for j, role in enumerate(loop.roles):
        if role not in ("carry", "counter"):
            continue
        tin, tout = by_id.get(loop.operand_inputs[j]), by_id.get(loop.operand_outputs[j])
        if tin is None or tout is None:
            _fail(f"{where}: carry {j} has no tensor in the body plan")
            return
        a = {r.tier for r in tin.residency if r.from_step <= 0 <= r.to_step}
        b = {r.tier for r in tout.residency if r.from_step <= last <= r.to_step}
        if a and b and not a & b:
            need_s += transfer_time_s(tout.nbytes, min(b), min(a), plan.target)
    if not _close_le(need_s, loop.back_edge_s):
        _fail(f"{where}: carried state changes tier across the back edge ({need_s} s of moves), "
              f"but back_edge_s is {loop.back_edge_s} s")
    # Capacity while the loop runs.
    boundary = {t.id for t in body.tensors if t.producer_step < 0}
    boundary |= {loop.operand_outputs[j] for j in loop.operand_outputs}
    held = _occupancy_at(plan, op.step)
    for tier in plan.target.tiers:
        reserve = int(loop.reserved_bytes.get(tier.name, 0))
        if held[tier.name] + reserve > tier.capacity_bytes:
            _fail(f"{where}: tier {tier.name} holds {held[tier.name]} bytes at step {op.step} "
                  f"and the loop reserves {reserve}, over its capacity {tier.capacity_bytes}")
        peak = 0
        for s in range(body.num_steps):
            own = sum(t.nbytes for t in body.tensors if t.id not in boundary and any(
                r.tier == tier.name and r.from_step <= s <= r.to_step for r in t.residency))
            peak = max(peak, own)
        floor = peak + int(loop.double_buffer_bytes.get(tier.name, 0))
        if reserve < floor:
            _fail(f"{where}: reserves {reserve} bytes of {tier.name}, less than its body's "
                  f"own peak plus double buffers ({floor})")


@dataclass(frozen=True)
class VerifyPass:
    """Re-check the plan independently. Requires `state.plan`; changes nothing."""

    name: ClassVar[str] = "verify"

    def run(self, state: PipelineState) -> PipelineState:
        if state.plan is None:
            raise PassError(self.name, "no plan to verify: run 'place-tiers' first")
        verify_plan(state.plan, state.program)
        return state
