"""The greedy strategy's steps on hand-built instances whose costs are worked out by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.passes.helpers import FAST_BPS, MIB, SLOW_BPS, program, two_tier
from tiermap.ir.program import Program
from tiermap.placement.baselines import _read_in_place
from tiermap.placement.cost_state import CostState
from tiermap.placement.problem import PlacementProblem
from tiermap.placement.segments import Choice

S = MIB
TINY = 4
SLOW_LINK_BPS = 1e9  # ten times slower than reading the slow tier


def _idle_program() -> Program:
    """X (S bytes) written at 0 and read at 1, idle over steps 2..5 (a chain of scalars), read
    again at 6."""
    sizes = {"a": TINY, "X": S, "b": TINY, "c": TINY, "d": TINY, "e": TINY, "f": TINY,
             "out": TINY}
    return program(sizes, ["a"], [
        (["a"], ["X"], 0.0), (["X"], ["b"], 0.0), (["b"], ["c"], 0.0), (["c"], ["d"], 0.0),
        (["d"], ["e"], 0.0), (["e"], ["f"], 0.0), (["X", "f"], ["out"], 0.0)], ["out"])


def test_read_in_place_trades_a_slow_round_trip_for_slow_reads() -> None:
    """X sits in fast for its two reads and goes to slow over its idle gap: the eviction and
    the prefetch each take S / 1e9 s on the link, and the scalar steps hide none of it. Reading
    X from slow instead costs S / 1e10 s at each of its three accesses (written at 0, read at 1
    and 6), less than a tenth of that: `_read_in_place` makes the trade."""
    prog = _idle_program()
    problem = PlacementProblem(prog, two_tier(S + 4096, link_bytes_per_s=SLOW_LINK_BPS),
                               pin=False)
    fast, slow = problem.tier_names.index("fast"), problem.tier_names.index("slow")
    start = {vid: Choice.whole(seg, fast) for vid, seg in problem.segments.items()}
    seg = problem.segments["X"]
    assert len(seg.runs) == 2 and len(seg.gaps) == 1
    start["X"] = Choice((fast, fast), (slow,))
    state = CostState(problem, start)
    scalar_s = (TINY + TINY + 4 * 2 * TINY + 2 * TINY) / FAST_BPS  # a; b; steps 2..5; f, out
    round_trip_s = state.total_time_s()
    assert round_trip_s >= 2 * S / SLOW_LINK_BPS
    _read_in_place(state)
    assert state.assignment["X"] == Choice.whole(seg, slow)
    assert state.total_time_s() == pytest.approx(3 * S / SLOW_BPS + scalar_s, rel=1e-9)
    assert state.within_capacity()


def test_read_in_place_keeps_a_round_trip_the_compute_hides() -> None:
    """The same program with 1 ms of compute at every idle step: the round trip is hidden, the
    fast reads are cheaper, and nothing changes."""
    prog = _idle_program()
    prog = replace(prog, ops=tuple(replace(op, flops=1e9) if 2 <= op.step <= 5 else op
                                   for op in prog.ops))
    problem = PlacementProblem(prog, two_tier(S + 4096, link_bytes_per_s=SLOW_LINK_BPS),
                               pin=False)
    fast, slow = problem.tier_names.index("fast"), problem.tier_names.index("slow")
    start = {vid: Choice.whole(seg, fast) for vid, seg in problem.segments.items()}
    start["X"] = Choice((fast, fast), (slow,))
    state = CostState(problem, start)
    before_s = state.total_time_s()
    _read_in_place(state)
    assert state.assignment["X"] == Choice((fast, fast), (slow,))
    assert state.total_time_s() == before_s
