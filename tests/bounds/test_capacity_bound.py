"""The capacity LP bound on hand-worked instances: it charges what the per-step bound misses."""

from __future__ import annotations

import dataclasses

import pytest

from tests.passes.helpers import FAST_BPS, MIB, SLOW_BPS, program, two_tier
from tiermap.bounds.capacity_lp import LP_TOLERANCE_SLACK, capacity_lower_bound
from tiermap.bounds.knapsack import program_lower_bound_s
from tiermap.hardware.target import Target
from tiermap.ir.program import Program
from tiermap.passes.verify import verify_plan
from tiermap.pipeline import plan
from tiermap.placement.place_tiers import PlaceTiersPass

S = MIB
ROOM = 4096


def _two_big_tensors() -> tuple[object, object]:
    """X (S bytes) is written at step 0 and read at step 3; Y (S bytes) lives over steps 1-2.
    The fast tier holds one of them (S + 4 KiB): each step alone fits it, both together not.
    The link is very slow (1e4 B/s): no share of either can move in the time the plan takes."""
    sizes = {"a": 4, "X": S, "Y": S, "r": 4, "out": 4}
    prog = program(sizes, ["a"], [
        (["a"], ["X"], 0.0), (["a"], ["Y"], 0.0), (["Y"], ["r"], 0.0),
        (["X", "r"], ["out"], 0.0)], ["out"])
    return prog, two_tier(S + ROOM, link_bytes_per_s=1e4)


def _bound_and_optimum_keep_one_wholly_slow(prog: Program, target: Target) -> None:
    """Four steps of 4 S + 20 bytes at the fast tier, and two S-byte tensors of which the fast
    tier holds one (S + 4 KiB) where they meet: the optimal plan writes and reads one of them
    wholly at the slow tier; the LP may split them, so it charges (S - 4 KiB) of it."""
    per_step_s = (4 * S + 20) / FAST_BPS
    extra_s = 2 * (S - ROOM) * (1 / SLOW_BPS - 1 / FAST_BPS)
    result = capacity_lower_bound(prog, target, time_limit_s=10.0)
    assert result.status == "solved", result
    assert result.bound_s == pytest.approx((per_step_s + extra_s) * (1 - LP_TOLERANCE_SLACK),
                                           rel=1e-5)
    best = plan(prog, target=target, strategy="mip", time_limit_s=5, fusion=False)
    verify_plan(best, prog)
    best_s = per_step_s + 2 * S * (1 / SLOW_BPS - 1 / FAST_BPS)
    assert best.predicted_time_s == pytest.approx(best_s, rel=1e-9)
    assert best.predicted_time_s >= result.bound_s


def test_the_lp_charges_the_tensor_that_cannot_stay() -> None:
    prog, target = _two_big_tensors()
    # per step, everything fits the fast tier: 4S + 20 bytes at 1e12 B/s
    per_step_s = (4 * S + 20) / FAST_BPS
    assert program_lower_bound_s(prog, target) == pytest.approx(per_step_s, rel=1e-8)
    # over steps 1-2 the fast tier holds X (staying) and Y together only up to S + 4 KiB, so a
    # fraction (S - 4 KiB) / S of one of them is written and read at the slow tier's 1e10 B/s
    # (not moved: the link is far too slow); the 4-byte
    # tensors are charged at the fast tier and hold no room
    extra_s = 2 * (S - ROOM) * (1 / SLOW_BPS - 1 / FAST_BPS)
    result = capacity_lower_bound(prog, target, time_limit_s=10.0)
    assert result.status == "solved", result
    assert result.bound_s == pytest.approx((per_step_s + extra_s) * (1 - LP_TOLERANCE_SLACK),
                                           rel=1e-5)
    assert "fast" in result.detail


def test_the_plan_reports_and_respects_the_capacity_bound() -> None:
    prog, target = _two_big_tensors()
    base = plan(prog, target=target, strategy="mip", time_limit_s=5, fusion=False)
    from tiermap.pipeline import build_passes

    passes = [PlaceTiersPass(strategy="mip", time_limit_s=5, capacity_bound=True)
              if p.name == "place-tiers" else p
              for p in build_passes("mip", 5, fusion=False)]
    bounded = plan(prog, target=target, passes=passes)
    verify_plan(bounded, prog)
    assert bounded.lower_bound_s > base.lower_bound_s * 1.5
    # the best plan puts one of X, Y wholly in the slow tier: the bound is within 4 KiB of it
    best_s = (4 * S + 20) / FAST_BPS + 2 * S * (1 / SLOW_BPS - 1 / FAST_BPS)
    assert bounded.predicted_time_s == pytest.approx(best_s, rel=1e-9)
    assert bounded.predicted_time_s <= bounded.lower_bound_s * (1 + 2 * ROOM / S)
    assert any("capacity LP" in note for note in bounded.notes)


def test_a_reshape_result_starts_where_its_operand_is() -> None:
    """X is reshaped into Xr at step 1 and dies there; Xr is read at step 4, Y lives over steps
    2-3 (the fast tier holds one of Xr, Y: S + 4 KiB). Xr is X's buffer (tiermap/ir/plan.py), so it
    cannot appear in the slow tier for free at step 1: keeping Y fast means X is written to the
    slow tier (the link is far too slow to move it) and Xr read from there, S slow bytes twice,
    as for Y. Left apart, Xr's first residency would cost nothing and the bound would charge one
    slow read only."""
    sizes = {"a": 4, "X": S, "Xr": S, "Y": S, "r": 4, "out": 4}
    base = program(sizes, ["a"], [
        (["a"], ["X"], 0.0), (["X"], ["Xr"], 0.0), (["a"], ["Y"], 0.0), (["Y"], ["r"], 0.0),
        (["Xr", "r"], ["out"], 0.0)], ["out"])
    ops = list(base.ops)
    ops[1] = dataclasses.replace(ops[1], kind="stablehlo.reshape", bytes_read=0.0,
                                 bytes_written=0.0)
    prog = dataclasses.replace(base, ops=tuple(ops))
    _bound_and_optimum_keep_one_wholly_slow(prog, two_tier(S + ROOM, link_bytes_per_s=1e4))


def test_a_tensor_that_leaves_the_fast_tier_holds_it_until_its_copy_is_made() -> None:
    """(C9) X and Y of `_two_big_tensors`, but with a link 10x faster than the fast tier: a move
    costs next to nothing, yet X cannot leave the fast tier before step 1 (its copy starts after
    its write at step 0, and the fast tier holds X until the copy ends), where Y is written. So
    the optimum is still one of X, Y wholly in the slow tier, and the bound is the slow-link
    one. Without (C9) the LP would write X fast, copy it out over steps 1-2 without holding the
    fast tier and charge one slow read only."""
    prog, _slow_link = _two_big_tensors()
    _bound_and_optimum_keep_one_wholly_slow(
        prog, two_tier(S + ROOM, link_bytes_per_s=10 * FAST_BPS))


def test_no_binding_tier_means_no_lp() -> None:
    prog, _target = _two_big_tensors()
    result = capacity_lower_bound(prog, two_tier(4 * S))
    assert result.bound_s is None and result.status == "no binding tier"
