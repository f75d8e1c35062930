"""The plan of the program that runs: plan, trace as applied, plan again without what is not.

`tiermap.apply` realises some of a plan's decisions and lists the rest as not applied, with the
reason (tiermap/ir/decisions.py): an attention the jaxpr matcher does not recognise is left to
XLA, a move to host the applied program cannot place is not made, a body's host moves are not
mapped into the loop. A plan that still counted them would predict a program that does not run.
`plan_as_run` therefore plans again with each such decision forbidden (`Untaken`,
tiermap/ir/untaken.py: the attention fused as ordinary chains, the tensor kept in device memory,
the tensor stored instead of recomputed), traces that plan as applied, and repeats until every
decision the plan makes is applied or nothing new is left to forbid (at most `MAX_ROUNDS`
plans more). Forbidden decisions only ever accumulate, so the rounds end; each round is a
deterministic plan of the same program, so the result is deterministic too.

The kept plan carries the decisions as applied (`Plan.decisions`), a note saying what was
planned again and both predictions, and a warning if some decision it makes is still not
applied (the plan then counts it, and says so). Where the program does not fit without the
decisions that are not applied, the earlier plan is kept with that warning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tiermap.errors import InfeasiblePlacementError
from tiermap.ir.decisions import Decision, decision_counts
from tiermap.ir.untaken import ANY, Untaken
from tiermap.pipeline import plan as plan_fn
from tiermap.plan_views import Plan

# Plans made again at most, after the first (each forbids what the last one's program did not do).
MAX_ROUNDS = 3


def untaken_of(plan: Plan, decisions: Sequence[Decision]) -> Untaken:
    """The decisions of `plan` that `decisions` (the applied program's record) says are not
    applied, as decisions to forbid; a decision not applied that the plan does not make (an
    attention no plan group covers) maps to nothing."""
    groups: dict[str, tuple[str, str]] = {}
    for where, sub in [("", plan), *((f" of loop {lp.op_id}'s body", lp.body)
                                      for lp in plan.loops)]:
        for g in sub.attention:
            if g.output:
                groups[g.group + where] = (sub.program_name, g.output)
    bodies = {lp.op_id: lp.body.program_name for lp in plan.loops}
    inputs = plan.program.inputs if plan.program is not None else ()
    attention: set[tuple[str, str]] = set()
    on_device: set[tuple[str, str]] = set()
    recompute: set[tuple[str, str]] = set()
    top = plan.program_name
    for d in decisions:
        if d.applied:
            continue
        if d.kind == "attention" and d.subject in groups:
            attention.add(groups[d.subject])
        elif d.kind == "offload" and d.subject == "all":  # the applied program is jax.jit's
            attention.add((ANY, ANY))
            on_device.add((ANY, ANY))
            recompute.add((ANY, ANY))
        elif d.kind == "offload":
            on_device.add((top, d.subject))
        elif d.kind == "host-input" and d.subject.startswith("input "):
            pos = int(d.subject.split()[1])
            if pos < len(inputs):
                on_device.add((top, inputs[pos]))
        elif d.kind == "recompute":
            recompute.add((top, d.subject))
        elif d.kind == "loop" and d.subject in bodies:
            on_device.add((bodies[d.subject], ANY))
    return Untaken(frozenset(attention), frozenset(on_device), frozenset(recompute))


@dataclass(frozen=True)
class AsRun:
    """The kept plan (with its decisions, notes and warnings) and the plan it was made from
    (`source`, the object `decide` was called with: the caller's applied program is its); the
    first plan and its decisions as applied, for comparison."""

    plan: Plan
    source: Plan
    untaken: Untaken
    rounds: int
    first: Plan
    first_decisions: tuple[Decision, ...]


def _counts(decisions: Sequence[Decision]) -> str:
    return ", ".join(f"{kind} {left}" for kind, (_done, left) in decision_counts(decisions).items()
                     if left)


def plan_as_run(first: Plan, first_decisions: Sequence[Decision],
                replan: Callable[[Untaken], Plan], decide: Callable[[Plan], Sequence[Decision]],
                max_rounds: int = MAX_ROUNDS) -> AsRun:
    """The plan of the program that runs (module docstring).

    Args:
        first: the plan made without restrictions.
        first_decisions: its decisions as the applied program has them.
        replan: plans the same program again with the decisions to forbid.
        decide: traces a plan as applied and returns its decisions (`tiermap.apply`).
        max_rounds: plans made again at most.
    """
    plan, decisions = first, list(first_decisions)
    dropped: dict[tuple[str, str], Decision] = {}  # not applied, planned again without
    untaken = Untaken()
    rounds = 0
    blocked = ""
    while rounds < max_rounds:
        wanted = untaken.union(untaken_of(plan, decisions))
        if wanted == untaken:
            break
        try:
            again = replan(wanted)
        except InfeasiblePlacementError as exc:
            blocked = str(exc)
            break
        rounds += 1
        for d in decisions:
            if not d.applied and untaken_of(plan, [d]).union(untaken) != untaken:
                dropped.setdefault((d.kind, d.subject), replace(
                    d, priced=False, detail=d.detail + "; planned again without it (round "
                    f"{rounds}): the plan's prediction does not count it"))
        untaken = wanted
        plan, decisions = again, list(decide(again))
    notes = list(plan.notes)
    warnings = list(plan.warnings)
    if rounds:
        notes.append(
            f"planned as it runs: {rounds} plan(s) made again without the decisions the applied "
            f"program does not realise ({untaken.count()} forbidden: "
            f"{len(untaken.attention)} attention, {len(untaken.on_device)} kept in device "
            f"memory, {len(untaken.recompute)} not recomputed); predicted "
            f"{plan.predicted_time_s:.6g} s, where the first plan, counting them, predicted "
            f"{first.predicted_time_s:.6g} s")
    left = untaken_of(plan, decisions)
    if left or blocked:
        missing = [d for d in decisions if not d.applied]
        why = (f"without them the program does not fit ({blocked})" if blocked
               else f"they were still made after {rounds} plan(s) made again")
        warnings.append(
            f"the applied program does not realise {len(missing)} of the plan's decisions "
            f"({_counts(missing)}); {why}: the plan's prediction counts them, the program "
            "that runs does not (the decisions list each)")
    listed = {(d.kind, d.subject) for d in decisions}
    decisions += [d for key, d in dropped.items() if key not in listed]
    kept = Plan.of(replace(plan, decisions=tuple(decisions), notes=tuple(notes),
                           warnings=tuple(warnings)))
    return AsRun(kept, plan, untaken, rounds, first, tuple(first_decisions))


def as_run_plan(fn: Callable[..., Any], *args: Any, max_rounds: int = MAX_ROUNDS,
                **options: Any) -> AsRun:
    """`plan_as_run` for a JAX function: `tiermap.pipeline.plan(fn, *args, **options)`, traced
    as `tiermap.jit` runs it (`apply_plan(..., planned_only=True)`) on `args` (arrays or
    `jax.ShapeDtypeStruct`s). The function's keyword arguments are not supported here; the
    returned `source` is the plan to apply."""
    # local import: tiermap.apply imports jax at module level; `import tiermap` stays cheap
    from tiermap.apply import applied_decisions

    def replan(untaken: Untaken) -> Plan:
        return plan_fn(fn, *args, untaken=untaken, **options)

    def decide(p: Plan) -> list[Decision]:
        return applied_decisions(fn, p, *args)

    first = plan_fn(fn, *args, **options)
    return plan_as_run(first, decide(first), replan, decide, max_rounds)
