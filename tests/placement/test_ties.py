"""Alias ops (a reshape) tie their result to their operand's tier: every strategy keeps the two
together, the MIP's optimum accounts for it, and the verifier rejects a plan that splits them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.passes.helpers import FAST_BPS, MIB, SLOW_BPS, program, two_tier
from tiermap.errors import PassError
from tiermap.ir.plan import Plan, Residency
from tiermap.ir.program import Program
from tiermap.passes.verify import verify_plan
from tiermap.pipeline import plan
from tiermap.placement.baselines import greedy_assignment, naive_assignment
from tiermap.placement.problem import PlacementProblem

S = MIB


def _reshaped(prog: Program, step: int) -> Program:
    """`prog` with the op at `step` made a reshape (free: no bytes, no flops)."""
    ops = tuple(replace(op, kind="stablehlo.reshape", bytes_read=0, bytes_written=0, flops=0.0)
                if op.step == step else op for op in prog.ops)
    return replace(prog, ops=ops)


def _tied_program() -> Program:
    """X (S bytes) written at 0, reshaped to Y at 1, Y read at 2, X read again at 3."""
    sizes = {"a": 4, "X": S, "Y": S, "out": 4, "out2": 4}
    prog = program(sizes, ["a"], [
        (["a"], ["X"], 0.0), (["X"], ["Y"], 0.0), (["Y"], ["out"], 0.0),
        (["X"], ["out2"], 0.0)], ["out", "out2"])
    return _reshaped(prog, 1)


def _tiers_at(p: Plan, tid: str, step: int) -> set[str]:
    t = next(t for t in p.tensors if t.id == tid)
    return {r.tier for r in t.residency if r.from_step <= step <= r.to_step}


@pytest.mark.parametrize("strategy", ["naive", "greedy", "mip"])
def test_every_strategy_keeps_a_reshape_with_its_operand(strategy: str) -> None:
    prog = _tied_program()
    p = plan(prog, target=two_tier(S + 4096), strategy=strategy, time_limit_s=10, fusion=False)
    verify_plan(p, prog)
    assert _tiers_at(p, "X", 1) & _tiers_at(p, "Y", 1)


def test_the_mip_optimum_pays_for_the_tie() -> None:
    """The fast tier holds one of X and Y, not both, and at step 1 they must share a tier: so
    both are in slow then. Optimum, worked by hand: X written to slow at step 0 (S / 1e10 s),
    the reshape free, Y read from slow at step 2 (S / 1e10 s) while X is prefetched to fast over
    that step (S / 1e10 s on the link, hidden exactly), X read from fast at step 3 (S / 1e12 s);
    the 4-byte tensors sit in fast. Without the tie, X would stay in fast and Y would appear in
    slow for free: about half the time."""
    prog = _tied_program()
    p = plan(prog, target=two_tier(S + 4096), strategy="mip", time_limit_s=10, fusion=False)
    tiny_s = 4 / FAST_BPS
    expected_s = S / SLOW_BPS + tiny_s + 0.0 + S / SLOW_BPS + tiny_s + S / FAST_BPS + tiny_s
    assert p.predicted_time_s == pytest.approx(expected_s, rel=1e-9)
    assert _tiers_at(p, "Y", 1) == {"slow"}
    assert [(x.tensor, x.src, x.dst, x.start_step) for x in p.transfers] == [
        ("X", "slow", "fast", 2)]


def test_the_verifier_rejects_a_reshape_moved_away_from_its_operand() -> None:
    prog = _tied_program()
    p = plan(prog, target=two_tier(S + 4096), strategy="mip", time_limit_s=10, fusion=False)
    tensors = tuple(replace(t, residency=(Residency("fast", 1, 2),)) if t.id == "Y" else t
                    for t in p.tensors)
    with pytest.raises(PassError) as info:
        verify_plan(replace(p, tensors=tensors), prog)
    assert "its result Y resides in ['fast'], its operand X in ['slow']" in str(info.value)


def test_greedy_moves_tied_tensors_together() -> None:
    """With room for both, greedy brings X and Y into fast together (each move alone would
    break the tie, so it must move the pair), and naive places the group whole."""
    prog = _tied_program()
    problem = PlacementProblem(prog, two_tier(2 * S + 4096), pin=False)
    assert [(t.src, t.src_run, t.dst, t.dst_run) for t in problem.ties] == [("X", 0, "Y", 0)]
    assert problem.tie_group("Y") == ("X", "Y")
    for assignment in (naive_assignment(problem), greedy_assignment(problem)):
        assert problem.ties_hold(assignment)
    fast = problem.tier_names.index("fast")
    greedy = greedy_assignment(problem)
    assert greedy["X"].runs[0] == greedy["Y"].runs[0] == fast


def test_a_tie_that_cannot_follow_is_refused() -> None:
    """Moving X's tied run alone into a tier where Y may not go (read-only) is no valid move."""
    from tiermap.hardware.target import Target, Tier

    target = Target(name="ro", description="fast, slow and a read-only tier", platform="tpu",
                    peak_flops_per_s={"f32": 1e12}, units=1,
                    tiers=(Tier("fast", S + 4096, FAST_BPS, FAST_BPS),
                           Tier("slow", 10 * S, SLOW_BPS, SLOW_BPS),
                           Tier("flash", 10 * S, 1e9, 1e6, read_only=True)))
    sizes = {"X": S, "Y": S, "out": 4}
    prog = _reshaped(program(sizes, ["X"], [(["X"], ["Y"], 0.0), (["Y"], ["out"], 0.0)],
                             ["out"]), 0)
    problem = PlacementProblem(prog, target, pin=False)
    assignment = naive_assignment(problem)
    flash = problem.tier_names.index("flash")
    seg = problem.segments["X"]
    home = replace(assignment["X"], runs=(flash,) * len(seg.runs), home=flash)
    assert problem.with_ties(assignment, "X", home) is None
