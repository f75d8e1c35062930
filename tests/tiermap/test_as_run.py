"""The plan of the program that runs (tiermap/as_run.py): a decision the applied program does
not realise is planned again as not taken, so the plan predicts what runs."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import tiermap
from tiermap.apply.offload import host_moves, host_tiers
from tiermap.as_run import plan_as_run, untaken_of
from tiermap.errors import InfeasiblePlacementError
from tiermap.examples import models
from tiermap.ir.decisions import Decision
from tiermap.ir.plan import occupancy_bytes
from tiermap.ir.untaken import ANY, Untaken
from tiermap.sweep import with_capacity

REPO = Path(__file__).resolve().parents[2]
H100_4G = REPO / "benchmarks" / "targets" / "h100-4g.toml"
def test_attention_left_to_xla_is_planned_as_not_taken() -> None:
    """The loss also reads the attention's probabilities (models.regularised_attention_train):
    jax.grad's backward reads P from outside the attention, the shape keras-hub's GPT-2
    backward has, which the jaxpr matcher leaves to XLA."""
    step, (ws_spec, x_spec) = models.regularised_attention_train()
    ws = jax.random.normal(jax.random.key(0), ws_spec.shape) * 0.1
    x = jax.random.normal(jax.random.key(1), x_spec.shape)
    first = tiermap.plan(step, ws, x, target="h100", time_limit_s=10)
    assert [a.group for a in first.attention] == ["attn0"]
    assert first.attention[0].output  # the key a plan made again names it by
    fast = tiermap.jit(step, target="h100", time_limit_s=10)
    plan = fast.lower(ws, x).plan()
    assert plan.attention == ()
    assert any("planned as it runs: 1 plan(s) made again" in n for n in plan.notes)
    assert plan.predicted_time_s > first.predicted_time_s  # the scores are stored now
    dropped = [d for d in plan.decisions if not d.priced]
    assert [(d.kind, d.subject, d.applied) for d in dropped] == [("attention", "attn0", False)]
    assert "read elsewhere" in dropped[0].detail
    assert not plan.warnings
    plan.verify()
    report = plan.report()
    assert "no (planned without it)" in report
    again = tiermap.Plan.from_json(plan.to_json())
    assert again.decisions == plan.decisions
    got, want = fast(ws, x), jax.jit(step)(ws, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def starved() -> tuple:
    """A 1-layer GPT training step on h100-4g with HBM cut to half its peak: the plan moves
    activations to host (as tests/apply/test_offload.py)."""
    small = {"layers": 1, "d_model": 64, "heads": 2, "seq": 64, "batch": 4, "vocab": 128}
    fn, args = models.transformer_train(**small)
    target = tiermap.target(str(H100_4G))
    unlimited = tiermap.plan(fn, *args, target=target, strategy="greedy")
    peak = max(occupancy_bytes(unlimited)["hbm"])
    tight = with_capacity(target, "hbm", peak // 2)
    plan = tiermap.plan(fn, *args, target=tight, recompute="off")
    return fn, args, tight, plan


def test_a_move_not_placed_is_planned_in_device_memory(starved) -> None:
    """Say the applied program could not place the host moves of the largest evicted tensor:
    the plan made again keeps it in device memory, and the rest may still move."""
    fn, args, tight, plan = starved
    inputs = set(plan.program.inputs)
    moved = [tid for tid in host_moves(plan) if tid not in inputs]
    assert moved
    victim = max(moved, key=lambda t: plan.tensor(t).nbytes)
    decisions = [Decision("offload", tid, tid != victim, "test") for tid in host_moves(plan)]
    untaken = untaken_of(plan, decisions)
    assert untaken.on_device == {(plan.program_name, victim)}

    def replan(u: Untaken) -> tiermap.Plan:
        return tiermap.plan(fn, *args, target=tight, recompute="off", untaken=u)

    def decide(p: tiermap.Plan) -> list[Decision]:
        return [Decision("offload", tid, True, "test") for tid in host_moves(p)]

    result = plan_as_run(plan, decisions, replan, decide)
    host = host_tiers(result.plan)
    assert result.rounds == 1
    assert all(r.tier not in host for r in result.plan.tensor(victim).residency)
    assert victim not in host_moves(result.plan)
    result.plan.verify()
    assert not result.plan.warnings
    kept = [d for d in result.plan.decisions if not d.priced]
    assert [d.subject for d in kept] == [victim]


def test_a_plan_that_cannot_do_without_its_moves_is_kept_with_a_warning(starved) -> None:
    """Nothing may go to host, and the program does not fit device memory without it: the plan
    with the moves is kept, and a warning says its prediction counts moves that do not run."""
    fn, args, tight, plan = starved
    decisions = [Decision("offload", tid, False, "test") for tid in host_moves(plan)]
    with pytest.raises(InfeasiblePlacementError, match="must stay in device memory"):
        tiermap.plan(fn, *args, target=tight, recompute="off",
                     untaken=Untaken(on_device=frozenset({(ANY, ANY)})))

    def replan(u: Untaken) -> tiermap.Plan:
        return tiermap.plan(fn, *args, target=tight, recompute="off",
                            untaken=Untaken(u.attention, u.on_device | {(ANY, ANY)}))

    result = plan_as_run(plan, decisions, replan, lambda p: decisions)
    assert result.plan.predicted_time_s == plan.predicted_time_s
    assert result.rounds == 0
    assert any("does not fit" in w and "counts them" in w for w in result.plan.warnings)


def test_a_recomputation_not_applied_is_stored_instead() -> None:
    """Forbid one of a no-host plan's recomputations: the plan made again does not recompute
    that tensor."""
    fn, args = models.transformer_train(layers=1, d_model=64, heads=2, seq=64, batch=4,
                                        vocab=128)
    target = tiermap.target(str(REPO / "benchmarks" / "targets" / "h100-1g-nohost.toml"))
    unlimited = tiermap.plan(fn, *args, target=target, strategy="greedy", recompute="off")
    peak = max(occupancy_bytes(unlimited)["hbm"])
    tight = with_capacity(target, "hbm", int(peak * 0.8))
    plan = tiermap.plan(fn, *args, target=tight, time_limit_s=10)
    assert plan.recomputes
    victim = plan.recomputes[0].tensor
    untaken = untaken_of(plan, [Decision("recompute", victim, False, "test")])
    assert untaken.recompute == {(plan.program_name, victim)}
    again = tiermap.plan(fn, *args, target=tight, time_limit_s=10, untaken=untaken)
    assert victim not in {r.tensor for r in again.recomputes}
    again.verify()


def test_untaken_round_trips_and_matches_wildcards() -> None:
    u = Untaken(attention=frozenset({("p", "t1")}), on_device=frozenset({("body", ANY)}),
                recompute=frozenset({(ANY, ANY)}))
    assert Untaken.from_dict(u.to_dict()) == u
    assert not u.fuses_attention("p", "t1") and u.fuses_attention("p", "t2")
    assert u.device_only("body", "t9") and not u.device_only("p", "t9")
    assert not u.may_recompute("anything", "t3")
    assert not Untaken() and u.count() == 3


def test_a_loop_body_whose_moves_are_not_applied_must_stay_in_device_memory() -> None:
    """A `loop` decision not applied (a body plan's host moves) forbids host tiers to every
    tensor of that body when the plan is made again: with HBM at half the step's peak the
    first plan's body holds tensors in host, and without host the body no longer fits beside
    the enclosing plan, which the error says (plan_as_run then keeps the first plan, warned)."""
    fn, args = models.transformer_train(layers=2, d_model=64, heads=2, seq=64, batch=2,
                                        vocab=128, scan=True)
    h100 = tiermap.target("h100")
    peak = max(occupancy_bytes(tiermap.plan(fn, *args, target=h100, time_limit_s=10))["hbm"])
    tight = with_capacity(h100, "hbm", peak // 2)
    plan = tiermap.plan(fn, *args, target=tight, time_limit_s=10)
    loop = next(lp for lp in plan.loops
                if any(r.tier in host_tiers(lp.body) for t in lp.body.tensors
                       for r in t.residency))
    decisions = [Decision("loop", loop.op_id, False, "test")]
    untaken = untaken_of(plan, decisions)
    assert untaken.on_device == {(loop.body.program_name, ANY)}
    with pytest.raises(InfeasiblePlacementError, match="must stay in device memory"):
        tiermap.plan(fn, *args, target=tight, time_limit_s=10, untaken=untaken)
    result = plan_as_run(plan, decisions, lambda u: tiermap.plan(
        fn, *args, target=tight, time_limit_s=10, untaken=u), lambda p: decisions)
    assert result.plan.predicted_time_s == plan.predicted_time_s
    assert any("does not fit" in w for w in result.plan.warnings)
