"""The independent verifier catches every kind of broken plan, naming the culprit."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.passes.helpers import MIB, program, sram_flash, two_tier
from tiermap.costmodel.evaluate import plan_step_times_s as step_times_s
from tiermap.errors import PassError
from tiermap.ir.plan import Plan, Residency, TensorPlan
from tiermap.passes.verify import verify_plan
from tiermap.pipeline import plan

S = MIB


def _evict_plan() -> Plan:
    sizes = {"a": 4, "X": S, "q": 4, "Y": S, "r": 4, "u": 4, "out": 4}
    prog = program(sizes, ["a"], [
        (["a"], ["X"], 0.0), (["a"], ["q"], 1e9), (["q"], ["Y"], 0.0),
        (["Y"], ["r"], 0.0), (["r"], ["u"], 1e9), (["X", "u"], ["out"], 0.0)], ["out"])
    p = plan(prog, target=two_tier(S + 4096), strategy="mip", time_limit_s=10, fusion=False)
    assert len(p.transfers) == 2
    return p


@pytest.fixture(scope="module")
def good() -> Plan:
    return _evict_plan()


def _with_tensor(p: Plan, tid: str, **changes: object) -> Plan:
    tensors = tuple(replace(t, **changes) if t.id == tid else t for t in p.tensors)
    return replace(p, tensors=tensors)


def _fails(p: Plan, *needles: str) -> None:
    with pytest.raises(PassError) as info:
        verify_plan(p)
    assert info.value.pass_name == "verify"
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_a_good_plan_verifies_with_and_without_its_program(good: Plan) -> None:
    verify_plan(good)
    verify_plan(Plan.from_json(good.to_json()))


def test_a_gap_in_residency_is_caught(good: Plan) -> None:
    _fails(_with_tensor(good, "Y", residency=(Residency("fast", 2, 2),)),
           "tensor Y resides nowhere at step 3")


def test_residency_outside_the_live_range_is_caught(good: Plan) -> None:
    _fails(_with_tensor(good, "Y", residency=(Residency("fast", 1, 3),)),
           "tensor Y", "leaves its live range [2, 3]")


def test_overlapping_intervals_in_one_tier_are_caught(good: Plan) -> None:
    _fails(_with_tensor(good, "Y", residency=(Residency("fast", 2, 3), Residency("fast", 3, 3))),
           "overlap in tier fast")


def test_a_change_of_tier_without_its_transfer_is_caught(good: Plan) -> None:
    _fails(replace(good, transfers=good.transfers[:1]),
           "tensor X", "needs a transfer into fast starting at step 4")


def test_an_output_is_written_into_one_tier(good: Plan) -> None:
    # Y is produced at step 2: resident in both tiers from there would be a free copy
    _fails(_with_tensor(good, "Y", residency=(Residency("fast", 2, 3), Residency("slow", 2, 3))),
           "tensor Y: resides in fast, slow from its producer step 2")


def test_transfer_bytes_must_be_the_tensor_size(good: Plan) -> None:
    broken = (replace(good.transfers[0], bytes=123),) + good.transfers[1:]
    _fails(replace(good, transfers=broken), "moves 123 bytes", f"has {S}")


def _chunked(good: Plan, first_bytes: int, second_step: int = 2) -> Plan:
    """`good` with X's eviction made in two chunks, at step 1 and `second_step` (the fast tier
    holds X to then, and has the room for it beside Y)."""
    evict, prefetch = good.transfers
    chunks = (replace(evict, bytes=first_bytes),
              replace(evict, start_step=second_step, end_step=second_step,
                      bytes=S - first_bytes), prefetch)
    roomy = replace(good.target, tiers=(replace(good.target.tiers[0], capacity_bytes=3 * S),
                                        good.target.tiers[1]))
    x = good.tensor("X")
    held = (Residency("fast", 0, second_step),) + x.residency[1:]
    p = replace(_with_tensor(good, "X", residency=held), transfers=chunks, target=roomy,
                program=None)
    return replace(p, predicted_time_s=sum(step_times_s(p)), baselines={})


def test_a_move_may_be_made_in_chunks(good: Plan) -> None:
    p = _chunked(good, S // 4)
    verify_plan(p)
    verify_plan(Plan.from_json(p.to_json()))


def test_chunks_must_add_up_to_the_tensor(good: Plan) -> None:
    p = _chunked(good, S // 4)
    short = (p.transfers[0], replace(p.transfers[1], bytes=S // 2), p.transfers[2])
    _fails(replace(p, transfers=short), "tensor X", "moves 786432 bytes in 2 transfer(s)",
           f"has {S}")


def test_chunks_run_one_after_another(good: Plan) -> None:
    p = _chunked(good, S // 4)
    late = (replace(p.transfers[0], end_step=2), p.transfers[1], p.transfers[2])
    _fails(replace(p, transfers=late), "tensor X", "overlap")


def test_chunks_come_from_one_source(good: Plan) -> None:
    p = _chunked(good, S // 4)
    x = p.tensor("X")
    # a third tier gets a copy of X at step 1, and the second chunk is taken from it
    third = replace(p.target.tiers[1], name="other")
    target = replace(p.target, tiers=p.target.tiers + (third,))
    held = x.residency + (Residency("other", 1, 2),)
    mixed = (p.transfers[0], replace(p.transfers[1], src="other"), p.transfers[2],
             replace(p.transfers[0], dst="other", bytes=S))
    _fails(replace(_with_tensor(p, "X", residency=held), target=target, transfers=mixed),
           "tensor X", "comes from fast, other")


def test_an_input_must_be_usable_when_read(good: Plan) -> None:
    # op5 made to read Y, which nothing holds after step 3
    ops = tuple(replace(o, inputs=("Y", "u")) if o.id == "op5" else o for o in good.ops)
    _fails(replace(good, ops=ops, program=None), "op op5", "at step 5 reads Y", "not usable")


def test_capacity_is_checked_at_every_step_for_every_tier(good: Plan) -> None:
    small = replace(good.target, tiers=(replace(good.target.tiers[0], capacity_bytes=S // 2),
                                        good.target.tiers[1]))
    _fails(replace(good, target=small, program=None), "tier fast holds", "over its capacity")


def test_mip_must_not_be_worse_than_its_baselines(good: Plan) -> None:
    _fails(replace(good, baselines={"greedy": good.predicted_time_s * 0.5}),
           "worse than baseline greedy")


def test_predicted_time_must_cover_the_ops_and_the_bound(good: Plan) -> None:
    _fails(replace(good, predicted_time_s=good.predicted_time_s * 0.5), "below the sum of op")
    _fails(replace(good, lower_bound_s=good.predicted_time_s * 2), "beats the lower bound")


def test_op_times_must_reach_the_compute_bound(good: Plan) -> None:
    ops = tuple(replace(o, predicted_time_s=1e-9) if o.id == "op1" else o for o in good.ops)
    _fails(replace(good, ops=ops), "op op1", "compute bound")


def test_fused_tensors_have_no_residency(good: Plan) -> None:
    _fails(_with_tensor(good, "q", materialized=False), "tensor q is fused")


def test_read_only_tiers_hold_inputs_only() -> None:
    prog = program({"x": 4096, "W": 256 * 1024, "y": 4}, ["x", "W"],
                   [(["x", "W"], ["y"], 0.0)], ["y"])
    p = plan(prog, target=sram_flash(64 * 1024, MIB), strategy="greedy")
    verify_plan(p)
    bad = _with_tensor(p, "y", residency=(Residency("flash", 0, 0),))
    _fails(bad, "tensor y", "read-only tier flash")


def test_scratch_tiers_hold_nothing(good: Plan) -> None:
    scratch = replace(good.target.tiers[0], per_unit=True)
    target = replace(good.target, tiers=(scratch, good.target.tiers[1]))
    _fails(replace(good, target=target, program=None), "per-unit scratchpad")


def test_the_plan_lists_every_tensor_of_its_program(good: Plan) -> None:
    missing = replace(good, tensors=tuple(t for t in good.tensors if t.id != "u"))
    with pytest.raises(PassError, match="lacks tensors"):
        verify_plan(missing, good.program)
    assert isinstance(good.tensors[0], TensorPlan)
