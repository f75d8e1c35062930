"""evaluate(): transfers hiding behind compute, usable copies, fused splits, occupancy, plans."""

from __future__ import annotations

import json

import pytest

from tests.costmodel.helpers import OVERHEAD_S, chain_program, everywhere, two_tier_target
from tiermap.bounds.knapsack import program_lower_bound_s
from tiermap.costmodel import evaluate
from tiermap.errors import TiermapError
from tiermap.ir.fusion import Fusion, FusionGroup
from tiermap.ir.plan import Plan, Residency, SolverInfo, Transfer
from tiermap.ir.program import Op, Program, TensorType, Value
from tiermap.placement.build import build_plan


def _prefetch_program(c_bytes: int, op0_flops: float) -> Program:
    """op0: a -> b (op0_flops); op1: b, c -> d. `c` is an input worth prefetching."""
    f32 = "f32"
    values = {
        "a": Value("a", TensorType((1000,), f32), -1),
        "c": Value("c", TensorType((c_bytes // 4,), f32), -1),
        "b": Value("b", TensorType((1000,), f32), 0),
        "d": Value("d", TensorType((1000,), f32), 1),
    }
    ops = (
        Op("op0", "stablehlo.add", 0, ("a",), ("b",), flops=op0_flops, bytes_read=4000,
           bytes_written=4000, attrs={"compute_dtype": f32}),
        Op("op1", "stablehlo.add", 1, ("b", "c"), ("d",), flops=1000.0,
           bytes_read=4000 + c_bytes, bytes_written=4000, attrs={"compute_dtype": f32}),
    )
    return Program("prefetch", ops, values, ("a", "c"), ("d",))


def _prefetch_plan(c_bytes: int, end_step: int = 0) -> tuple[dict[str, list[Residency]],
                                                             list[Transfer]]:
    res = {
        "a": [Residency("fast", 0, 0)],
        "b": [Residency("fast", 0, 1)],
        "c": [Residency("slow", 0, end_step), Residency("fast", 0, 1)],
        "d": [Residency("fast", 1, 1)],
    }
    return res, [Transfer("c", "slow", "fast", 0, end_step, c_bytes)]


def test_a_transfer_overlapping_compute_hides() -> None:
    p = _prefetch_program(4000, op0_flops=2e6)  # op0: 2 µs compute
    tgt = two_tier_target()
    ev = evaluate(p, tgt, *_prefetch_plan(4000))
    # The copy takes 4000 B / min(slow read 1e11, fast write 5e11) = 40 ns < op0's 3 µs.
    assert ev.op_time_s[0] == pytest.approx(2e-6 + OVERHEAD_S)
    assert ev.step_time_s[0] == ev.op_time_s[0]
    # op1 reads c from 'fast' (the copy finished at step 0).
    assert dict(ev.op_bytes_by_tier[1]) == {"fast": 12_000}
    assert ev.predicted_time_s == pytest.approx(sum(ev.op_time_s))
    assert ev.transfer_bound_steps == ()


def test_a_transfer_longer_than_the_op_shows_up() -> None:
    p = _prefetch_program(400_000, op0_flops=1000.0)
    tgt = two_tier_target()
    ev = evaluate(p, tgt, *_prefetch_plan(400_000))
    assert ev.step_time_s[0] == pytest.approx(400_000 / 1e11)  # 4 µs > op0's ~1 µs
    assert ev.step_time_s[1] == ev.op_time_s[1]
    assert ev.predicted_time_s == pytest.approx(4e-6 + ev.op_time_s[1])
    assert ev.transfer_bound_steps == (0,)
    # A declared faster link shortens it.
    fast_link = two_tier_target(link_bytes_per_s=4e11)
    assert evaluate(p, fast_link, *_prefetch_plan(400_000)).step_time_s[0] == pytest.approx(
        ev.op_time_s[0])


def test_a_transfer_spreads_over_its_steps_and_its_copy_is_unusable_until_done() -> None:
    p = _prefetch_program(400_000, op0_flops=1000.0)
    tgt = two_tier_target()
    ev = evaluate(p, tgt, *_prefetch_plan(400_000, end_step=1))
    assert ev.step_time_s[0] == pytest.approx(2e-6)  # half of 4 µs at each step
    # At step 1 the fast copy is still arriving: op1 reads c from slow.
    assert dict(ev.op_bytes_by_tier[1]) == {"fast": 8000, "slow": 400_000}
    assert ev.op_time_s[1] == pytest.approx(4000 / 1e12 + 400_000 / 1e11 + 4000 / 5e11
                                            + OVERHEAD_S)
    assert ev.step_time_s[1] == pytest.approx(max(ev.op_time_s[1], 2e-6))


def test_traffic_occupancy_and_energy() -> None:
    p = _prefetch_program(4000, op0_flops=10.0)
    tgt = two_tier_target(energy=True)
    ev = evaluate(p, tgt, *_prefetch_plan(4000))
    # Ops: op0 reads a, writes b (fast); op1 reads b, c, writes d (fast). The copy: both tiers.
    assert dict(ev.traffic_bytes) == {"fast": 20_000 + 4000, "slow": 4000}
    assert ev.occupancy_bytes["fast"] == (4000 + 4000 + 4000, 4000 + 4000 + 4000)
    assert ev.occupancy_bytes["slow"] == (4000, 0)
    assert ev.energy_j == pytest.approx((24_000 * 1.0 + 4000 * 10.0) * 1e-12)
    assert evaluate(p, two_tier_target(), *_prefetch_plan(4000)).energy_j is None


def test_a_fused_group_splits_its_time_by_flops() -> None:
    p = chain_program([4000, 4000, 4000, 4000], [1e6, 3e6, 0.0])
    group = FusionGroup("g0", "elementwise", ("op0", "op1", "op2"), frozenset({"t1", "t2"}))
    fusion = Fusion((group,))
    tgt = two_tier_target()
    res = everywhere(p, "slow")
    for vid in ("t1", "t2"):
        del res[vid]
    ev = evaluate(p, tgt, res, [], fusion)
    group_s = 4e-6 + OVERHEAD_S  # compute 4 µs beats 4000/1e11 + 4000/5e10 = 0.12 µs
    assert ev.op_time_s == pytest.approx((group_s / 4, 3 * group_s / 4, 0.0))
    assert sum(ev.op_time_s) == pytest.approx(group_s)
    assert dict(ev.op_bytes_by_tier[0]) == {"slow": 4000}  # reads t0
    assert dict(ev.op_bytes_by_tier[2]) == {"slow": 4000}  # writes t3
    assert ev.unplaced == ()
    no_flops = chain_program([4000, 4000, 4000], [0.0, 0.0])
    g = Fusion((FusionGroup("g0", "elementwise", ("op0", "op1"), frozenset({"t1"})),))
    res = everywhere(no_flops, "slow")
    del res["t1"]
    ev = evaluate(no_flops, tgt, res, [], g)
    assert ev.op_time_s[0] == pytest.approx(ev.op_time_s[1])


def test_unplaced_tensors_are_reported_and_charged_to_a_slow_tier() -> None:
    p = chain_program([4000, 4000], [0.0])
    ev = evaluate(p, two_tier_target(), {"t0": [Residency("fast", 0, 0)]}, [])
    assert ev.unplaced == ("t1@0",)
    assert ev.num_unplaced == 1
    assert dict(ev.op_bytes_by_tier[0]) == {"fast": 4000, "slow": 4000}


def test_unknown_tier_or_tensor_is_named() -> None:
    p = chain_program([4000, 4000], [0.0])
    with pytest.raises(TiermapError, match="tier 'hbm'"):
        evaluate(p, two_tier_target(), {"t0": [Residency("hbm", 0, 0)]}, [])
    with pytest.raises(TiermapError, match="tensor 'nope'"):
        evaluate(p, two_tier_target(), {"nope": [Residency("fast", 0, 0)]}, [])


def test_build_plan_fills_every_op_and_tensor() -> None:
    p = chain_program([4000, 4000, 4000, 4000], [1e6, 3e6, 10.0])
    group = FusionGroup("g0", "elementwise", ("op0", "op1"), frozenset({"t1"}))
    fusion = Fusion((group,))
    tgt = two_tier_target()
    res = everywhere(p, "slow")
    del res["t1"]
    res["t3"] = [Residency("fast", 2, 2)]
    solver = SolverInfo("none", "heuristic", None, 0.0, None)
    plan = build_plan(p, tgt, "naive", res, [], fusion, None, {"naive": 1.0}, solver,
                      notes=("test",))
    assert [o.fusion_group for o in plan.ops] == ["g0", "g0", None]
    assert [t.id for t in plan.tensors] == ["t0", "t1", "t2", "t3"]
    t1 = plan.tensor("t1")
    assert not t1.materialized and t1.residency == ()
    assert plan.predicted_time_s == pytest.approx(sum(o.predicted_time_s for o in plan.ops))
    assert plan.lower_bound_s == pytest.approx(program_lower_bound_s(p, tgt, fusion))
    assert plan.lower_bound_s <= plan.predicted_time_s
    assert plan.ops[2].bytes_by_tier == {"slow": 4000, "fast": 4000}
    again = Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    assert json.loads(plan.to_json())["traffic_bytes"] == {"fast": 4000.0, "slow": 12_000.0}


def test_evaluate_is_fast_on_5k_ops() -> None:
    import time

    n = 5000
    p = chain_program([4000] * (n + 1), [1e3] * n)
    tgt = two_tier_target()
    res = everywhere(p, "slow")
    moves = [Transfer(f"t{i}", "slow", "fast", i - 2, i - 1, 4000) for i in range(2, n, 3)]
    for x in moves:
        res[x.tensor] = [Residency("slow", x.start_step + 1, x.end_step + 1),
                         Residency("fast", x.start_step, x.end_step + 1)]
    evaluate(p, tgt, res, moves)
    start = time.perf_counter()
    ev = evaluate(p, tgt, res, moves)
    elapsed_s = time.perf_counter() - start
    assert len(ev.step_time_s) == n
    assert elapsed_s < 0.5
