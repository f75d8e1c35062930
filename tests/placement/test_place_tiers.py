"""Placement on tiny programs whose optimum is worked out by hand."""

from __future__ import annotations

import math

import pytest

from tests.passes.helpers import FAST_BPS, MIB, SLOW_BPS, program, sram_flash, two_tier
from tiermap.errors import InfeasiblePlacementError
from tiermap.pipeline import plan as _plan

S = MIB  # one big tensor
TINY = 4  # an f32 scalar
LONG_FLOPS = 1e9  # 1 ms of compute at 1e12 FLOP/s


def plan(*args: object, **kwargs: object) -> object:
    """The pipeline without fusion: these programs are written op by op on purpose."""
    return _plan(*args, fusion=False, **kwargs)  # type: ignore[arg-type]


def _prefetch_program(compute_flops: float) -> object:
    # op0 reads A; op1 computes (no big tensor); op2 reads B. A and B are inputs of S bytes.
    return program(
        {"A": S, "B": S, "c0": TINY, "c1": TINY, "out": TINY}, ["A", "B"],
        [(["A"], ["c0"], 0.0), (["c0"], ["c1"], compute_flops), (["B", "c1"], ["out"], 0.0)],
        ["out"], name="prefetch")


def _times(p: object) -> tuple[float, float, float]:
    return tuple(o.predicted_time_s for o in p.ops)  # type: ignore[attr-defined]


def test_prefetch_hidden_behind_long_compute_is_the_optimum() -> None:
    """The fast tier holds one of A and B. Optimum: A fast for step 0; B starts slow and is
    prefetched during step 1, whose 1 ms of compute hides the 0.1 ms copy; step 2 reads B fast.
    """
    prog = _prefetch_program(LONG_FLOPS)
    target = two_tier(S + 4096)
    expected_s = ((S + TINY) / FAST_BPS          # step 0: read A, write c0
                  + LONG_FLOPS / 1e12            # step 1: compute-bound
                  + (S + 2 * TINY) / FAST_BPS)   # step 2: read B and c1, write out
    naive_s = (S + TINY) / FAST_BPS + LONG_FLOPS / 1e12 + S / SLOW_BPS + 2 * TINY / FAST_BPS
    best = plan(prog, target=target, strategy="mip", time_limit_s=10)
    assert best.predicted_time_s == pytest.approx(expected_s, rel=1e-9)
    assert best.solver.status == "optimal"
    moves = [(x.tensor, x.src, x.dst, x.start_step, x.end_step) for x in best.transfers]
    assert moves == [("B", "slow", "fast", 1, 1)]
    assert [(r.tier, r.from_step, r.to_step) for r in best.tensor("B").residency] == [
        ("slow", 0, 1), ("fast", 1, 2)]
    assert best.baselines["naive"] == pytest.approx(naive_s, rel=1e-9)
    assert best.predicted_time_s <= best.baselines["greedy"] * (1 + 1e-9)
    naive = plan(prog, target=target, strategy="naive")
    assert naive.predicted_time_s == pytest.approx(naive_s, rel=1e-9)
    assert naive.transfers == ()


def test_without_compute_to_hide_behind_one_tensor_is_read_from_slow_memory() -> None:
    """Same program, step 1 short: a prefetch of B would overlap step 0, where A fills the fast
    tier, so one of A and B is read from the slow tier either way."""
    prog = _prefetch_program(1e3)
    best = plan(prog, target=two_tier(S + 4096), strategy="mip", time_limit_s=10)
    expected_s = (S / FAST_BPS + S / SLOW_BPS            # A and B, one of them slow
                  + 3 * TINY / FAST_BPS                  # c0 written, c1 read, out written
                  + max(1e3 / 1e12, 2 * TINY / FAST_BPS))  # step 1
    assert best.predicted_time_s == pytest.approx(expected_s, rel=1e-9)


def test_eviction_and_prefetch_around_an_idle_gap() -> None:
    """X is written at step 0 and read at step 5; Y lives at steps 2-3; the fast tier holds one
    of them. Optimum: evict X during step 1 and prefetch it back during step 4 (both hidden by
    1 ms of compute), so every access is fast."""
    sizes = {"a": TINY, "X": S, "q": TINY, "Y": S, "r": TINY, "u": TINY, "out": TINY}
    prog = program(sizes, ["a"], [
        (["a"], ["X"], 0.0), (["a"], ["q"], LONG_FLOPS), (["q"], ["Y"], 0.0),
        (["Y"], ["r"], 0.0), (["r"], ["u"], LONG_FLOPS), (["X", "u"], ["out"], 0.0)],
        ["out"], name="evict")
    target = two_tier(S + 4096)
    fast_s = (4 * S + 5 * TINY) / FAST_BPS  # steps 0, 2, 3, 5 read and write in fast memory
    expected_s = fast_s + 2 * LONG_FLOPS / 1e12
    best = plan(prog, target=target, strategy="mip", time_limit_s=10)
    assert best.predicted_time_s == pytest.approx(expected_s, rel=1e-9)
    moves = sorted((x.tensor, x.src, x.dst, x.start_step, x.end_step) for x in best.transfers)
    assert moves == [("X", "fast", "slow", 1, 1), ("X", "slow", "fast", 4, 4)]
    assert best.lower_bound_s <= best.predicted_time_s
    naive = plan(prog, target=target, strategy="naive")
    naive_expected_s = expected_s - (2 * S) / FAST_BPS + (2 * S) / SLOW_BPS
    assert naive.predicted_time_s == pytest.approx(naive_expected_s, rel=1e-9)
    greedy = plan(prog, target=target, strategy="greedy")
    assert best.predicted_time_s <= greedy.predicted_time_s * (1 + 1e-9)
    assert greedy.predicted_time_s <= naive.predicted_time_s * (1 + 1e-9)


def test_everything_fits_the_fast_tier() -> None:
    prog = _prefetch_program(LONG_FLOPS)
    best = plan(prog, target=two_tier(4 * MIB), strategy="mip", time_limit_s=5)
    assert best.transfers == ()
    assert all(r.tier == "fast" for t in best.tensors for r in t.residency)
    assert best.solver.status == "optimal"
    assert best.predicted_time_s == pytest.approx(best.lower_bound_s, rel=1e-6)


@pytest.mark.parametrize("backend", ["scip", "cpsat"])
def test_other_backends_find_the_same_optimum(backend: str) -> None:
    prog = _prefetch_program(LONG_FLOPS)
    target = two_tier(S + 4096)
    ref = plan(prog, target=target, strategy="mip", time_limit_s=10)
    other = plan(prog, target=target, strategy="mip", time_limit_s=10, backend=backend,
                 workers=1)
    assert other.solver.backend == backend
    assert other.solver.workers == 1 and other.solver.seed == 0
    assert other.predicted_time_s == pytest.approx(ref.predicted_time_s, rel=1e-9)


def test_read_only_flash_holds_weights_and_reads_them_in_place() -> None:
    # W (256 KiB) fits only flash; x and y live in sram.
    prog = program({"x": 4096, "W": 256 * 1024, "y": TINY}, ["x", "W"],
                   [(["x", "W"], ["y"], 0.0)], ["y"], name="mcu")
    target = sram_flash(64 * 1024, MIB)
    for strategy in ("naive", "greedy", "mip"):
        p = plan(prog, target=target, strategy=strategy, time_limit_s=5)
        assert [r.tier for r in p.tensor("W").residency] == ["flash"]
        assert [r.tier for r in p.tensor("y").residency] == ["sram"]
        assert p.predicted_time_s == pytest.approx(256 * 1024 / 1e9 + (4096 + TINY) / 1e10,
                                                   rel=1e-9)


def test_a_result_too_big_for_every_writable_tier_is_infeasible() -> None:
    # y is produced by an op, so it may not live in read-only flash; sram is too small.
    prog = program({"x": 4096, "y": 128 * 1024}, ["x"], [(["x"], ["y"], 0.0)], ["y"],
                   name="too-big")
    with pytest.raises(InfeasiblePlacementError) as info:
        plan(prog, target=sram_flash(64 * 1024, MIB), strategy="mip")
    message = str(info.value)
    assert "tensor y" in message and "f32[32768]" in message
    assert "sram 65536 B" in message and str(128 * 1024 - 64 * 1024) in message


def test_a_step_whose_live_set_fits_nowhere_is_infeasible() -> None:
    # two 0.6 GB inputs live together at step 0; the tiers hold 1 GB + 1 MiB in all
    half = 600_000_000
    prog = program({"A": half, "B": half, "c": TINY}, ["A", "B"], [(["A", "B"], ["c"], 0.0)],
                   ["c"], name="too-much")
    with pytest.raises(InfeasiblePlacementError) as info:
        plan(prog, target=two_tier(MIB), strategy="greedy")
    message = str(info.value)
    assert "at step 0" in message and "A (f32[150000000]" in message
    missing = 2 * half + TINY - (MIB + 1_000_000_000)
    assert f"{missing} bytes missing" in message


def test_energy_objective_is_never_slower_nor_costlier_than_greedy() -> None:
    prog = _prefetch_program(LONG_FLOPS)
    target = two_tier(S + 4096, energy=True)
    best = plan(prog, target=target, strategy="mip", objective="energy", time_limit_s=10)
    greedy = plan(prog, target=target, strategy="greedy", objective="energy")

    def energy_pj(p: object) -> float:
        per = {"fast": 1.0, "slow": 10.0}
        return sum(b * per[t] for t, b in p.traffic_bytes.items())  # type: ignore[attr-defined]

    assert best.predicted_time_s <= greedy.predicted_time_s * (1 + 1e-9)
    assert energy_pj(best) <= energy_pj(greedy) * (1 + 1e-9)
    assert math.isfinite(best.predicted_time_s)


def test_time_limit_hit_is_reported_as_feasible_with_its_gap_or_falls_back() -> None:
    prog = _prefetch_program(LONG_FLOPS)
    p = plan(prog, target=two_tier(S + 4096), strategy="mip", time_limit_s=1e-3)
    assert p.solver.status in ("optimal", "feasible", "greedy_fallback")
    # the configured guard; 1 ms cannot be enough for the MIP, and the plan warns about it
    assert p.solver.time_limit_s == 1e-3
    assert p.warnings and all("guard" in w or "deadline" in w for w in p.warnings)
    if p.solver.status == "feasible":
        assert p.solver.gap is not None
    assert p.predicted_time_s <= p.baselines["greedy"] * (1 + 1e-9)


def test_a_hint_highs_rejects_is_dropped_not_fatal() -> None:
    """A window MIP (saved from a hypothesis case) on which HiGHS fails with an internal error
    when given the greedy incumbent as a partial MIP start, and solves without it."""
    import json
    from datetime import timedelta
    from pathlib import Path

    from ortools.math_opt import model_pb2
    from ortools.math_opt.python import mathopt as mo

    from tiermap.placement.mip_model import solve_with_hint_fallback

    data = Path(__file__).parent / "data"
    proto = model_pb2.ModelProto()
    proto.ParseFromString((data / "highs_hint_internal_error.pb").read_bytes())
    model = mo.Model.from_model_proto(proto)
    hint = {model.get_variable(int(k)): v for k, v in json.loads(
        (data / "highs_hint_internal_error.hint.json").read_text()).items()}
    params = mo.SolveParameters(time_limit=timedelta(seconds=20), random_seed=0)
    params.highs.int_options["threads"] = 1
    model_params = mo.ModelSolveParameters(solution_hints=[mo.SolutionHint(hint)])
    result = solve_with_hint_fallback(model, mo.SolverType.HIGHS, params, model_params, 20.0)
    assert result.termination.reason == mo.TerminationReason.OPTIMAL
    assert result.objective_value() == pytest.approx(49.59297232349792, rel=1e-6)


def test_respread_takes_a_transfer_off_a_kernel_another_one_rides() -> None:
    """A and B wait in the slow tier and are prefetched before their reads at steps 4 and 5.
    Alone, each copy (1 MiB at 1e10 B/s) hides under one 1.2e-4 s kernel, and both windows pick
    the first one (step 1), where together they stretch it to 2 * 1.048576e-4 s. Re-spreading
    moves one to the kernel at step 3: the plan gets 2 * 1.048576e-4 - 1.2e-4 s faster."""
    from tiermap.costmodel.evaluate import evaluate
    from tiermap.placement.problem import PlacementProblem
    from tiermap.placement.segments import Choice

    sizes = {"A": MIB, "B": MIB, "c": 4, "d": 4, "e": 4, "f": 4, "g": 4, "h": 4, "out": 4}
    prog = program(sizes, ["A", "B", "c"], [
        (["c"], ["d"], 0.0), (["d"], ["e"], 1.2e8), (["e"], ["f"], 0.0), (["f"], ["g"], 1.2e8),
        (["A", "g"], ["h"], 0.0), (["B", "h"], ["out"], 0.0)], ["out"])
    target = two_tier(4 * MIB)
    problem = PlacementProblem(prog, target, pin=False)
    fast, slow = 0, 1
    assignment = {vid: Choice.whole(seg, fast) for vid, seg in problem.segments.items()}
    for vid in ("A", "B"):
        assignment[vid] = Choice((fast,), (slow,))
    times = {}
    for respread in (False, True):
        residency, transfers = problem.to_plan_parts(assignment, respread=respread)
        steps = {x.tensor: (x.start_step, x.end_step) for x in transfers}
        times[respread] = evaluate(prog, target, residency, transfers).predicted_time_s
        if not respread:
            assert steps == {"A": (1, 1), "B": (1, 1)}
        else:
            assert sorted(steps.values()) == [(1, 1), (3, 3)]
            for vid, (start, _end) in steps.items():  # the copy is held from its first step
                assert residency[vid][-1].tier == "fast"
                assert residency[vid][-1].from_step == start
    copy_s = MIB / SLOW_BPS
    assert times[False] - times[True] == pytest.approx(2 * copy_s - 1.2e-4, rel=1e-9)


def _evict_and_prefetch(with_y: bool) -> tuple[float, float, dict[str, tuple[int, int]]]:
    """X (1 MiB) is written at step 0, read at 1 and 10, and waits in the slow tier over steps
    2..9: an eviction, then a prefetch. Kernels at steps 5 and 8 (1.2e-4 s each) hide one copy
    (1 MiB at 1e10 B/s = 1.048576e-4 s) each. The eviction's window is the first three steps of
    the gap (2..4, no compute), the prefetch's the last four (6..9). With `with_y`, Y (2 MiB)
    lives over steps 5..6 in the fast tier, which cannot hold X beside it. Returns the plan's
    time before and after re-spreading, and the transfers' steps after."""
    from tiermap.costmodel.evaluate import evaluate
    from tiermap.placement.problem import PlacementProblem
    from tiermap.placement.segments import Choice

    sizes = {"X": MIB, "Y": 2 * MIB, "a": 4, "out": 4,
             **{f"s{i}": 4 for i in range(1, 10)}}
    ops: list[tuple[list[str], list[str], float]] = [(["a"], ["X"], 0.0), (["X"], ["s1"], 0.0)]
    for step in range(2, 10):
        ins, outs = [f"s{step - 1}"], [f"s{step}"]
        if with_y and step == 5:
            outs.append("Y")
        if with_y and step == 6:
            ins.append("Y")
        ops.append((ins, outs, 1.2e8 if step in (5, 8) else 0.0))
    ops.append((["X", "W", "s9"] if with_y else ["X", "s9"], ["out"], 0.0))
    if with_y:
        sizes["W"] = MIB // 2
    else:
        del sizes["Y"]
    prog = program(sizes, ["a", "W"] if with_y else ["a"], ops, ["out"])
    target = two_tier(11 * MIB // 4)
    problem = PlacementProblem(prog, target, pin=False)
    fast, slow = 0, 1
    assignment = {vid: Choice.whole(seg, fast) for vid, seg in problem.segments.items()}
    assignment["X"] = Choice((fast, fast), (slow,))
    if with_y:
        assignment["W"] = Choice((fast,), (slow,))
    times, steps = [], {}
    for respread in (False, True):
        residency, transfers = problem.to_plan_parts(assignment, respread=respread)
        ev = evaluate(prog, target, residency, transfers)
        assert max(ev.occupancy_bytes["fast"]) <= target.tiers[0].capacity_bytes
        times.append(ev.predicted_time_s)
        steps = {f"{x.src}->{x.dst}": (x.start_step, x.end_step) for x in transfers}
    return times[0], times[1], steps


def test_respread_runs_an_eviction_past_its_window_where_the_source_has_room() -> None:
    """Re-spreading may run a move anywhere in its gap: the eviction leaves its window (steps
    2..4, where nothing hides it) for the kernel at step 5, the fast tier holding X to there;
    the plan gets one copy's time faster, less the three scalar ops the copy had stretched
    (each reads and writes 4 bytes in the fast tier)."""
    before_s, after_s, steps = _evict_and_prefetch(with_y=False)
    assert steps == {"fast->slow": (5, 5), "slow->fast": (8, 8)}
    assert before_s - after_s == pytest.approx(MIB / SLOW_BPS - 3 * 8 / FAST_BPS, rel=1e-9)


def test_respread_keeps_an_eviction_where_the_source_has_no_room_past_it() -> None:
    """With Y beside it at step 5 the fast tier cannot hold X there: the eviction stays in its
    window. W's and X's prefetches both start on the kernel at step 8 and stretch it; moving
    one of them is a gain re-spreading keeps (it would be thrown away with the rest had the
    eviction been run onto step 5 and overfilled the fast tier)."""
    before_s, after_s, steps = _evict_and_prefetch(with_y=True)
    assert 2 <= steps["fast->slow"][0] <= steps["fast->slow"][1] <= 4
    assert after_s < before_s


def test_a_copy_too_big_for_one_kernel_is_made_in_chunks_under_two() -> None:
    """X (1 MiB, 1.048576e-4 s over the link) waits in the slow tier until its read at step 4;
    kernels of 6e-5 s at steps 1 and 3 sit around a scalar op at step 2 (8e-12 s). Spread
    evenly, the copy either stretches one kernel by 4.48576e-5 s or, over steps 1..3, puts a
    third of it (3.4952533e-5 s) on the scalar op. In two chunks, one per kernel, half the copy
    hides under each: the plan takes its op times, a third of the copy less the scalar op
    faster than the even spread over 1..3."""
    from tiermap.costmodel.evaluate import evaluate
    from tiermap.placement.problem import PlacementProblem
    from tiermap.placement.segments import Choice

    sizes = {"X": MIB, "c": 4, "d": 4, "e": 4, "f": 4, "g": 4, "out": 4}
    prog = program(sizes, ["X", "c"], [
        (["c"], ["d"], 0.0), (["d"], ["e"], 0.6e8), (["e"], ["f"], 0.0), (["f"], ["g"], 0.6e8),
        (["X", "g"], ["out"], 0.0)], ["out"])
    target = two_tier(4 * MIB)
    problem = PlacementProblem(prog, target, pin=False)
    fast, slow = 0, 1
    assignment = {vid: Choice.whole(seg, fast) for vid, seg in problem.segments.items()}
    assignment["X"] = Choice((fast,), (slow,))
    times = []
    for respread in (False, True):
        residency, transfers = problem.to_plan_parts(assignment, respread=respread)
        ev = evaluate(prog, target, residency, transfers)
        times.append(ev.predicted_time_s)
        moves = [(x.start_step, x.end_step, x.bytes) for x in transfers]
        if respread:
            assert moves == [(1, 1, MIB // 2), (3, 3, MIB // 2)]
            assert ev.step_time_s == ev.op_time_s  # every chunk hidden
            assert residency["X"][-1].from_step == 1  # held from the first chunk
        else:
            assert moves == [(1, 3, MIB)]
    scalar_s = 8 / FAST_BPS  # step 2 reads and writes 4 bytes
    assert times[0] - times[1] == pytest.approx(MIB / SLOW_BPS / 3 - scalar_s, rel=1e-9)
