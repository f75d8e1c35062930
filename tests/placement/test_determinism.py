"""Deterministic plans: the solvers stop at work limits, so the same input gives the same plan
JSON (wall-clock keys aside) however fast or busy the machine is."""

from __future__ import annotations

import json

import pytest

from tests.passes.helpers import busy, strip_wall
from tests.placement.test_deadline import _forward_backward, _placed_state
from tiermap.mathopt import WorkBudget, solve_parameters
from tiermap.placement.mip_model import WINDOW_NODE_LIMIT
from tiermap.placement.place_tiers import PlaceTiersPass


def _plan_json(backend: str = "highs", workers: int | None = None) -> str:
    # 40 layers with 60-binary windows: the MIP is swept over many windows
    state = _placed_state(_forward_backward(40), None)
    out = PlaceTiersPass(time_limit_s=60.0, backend=backend, workers=workers,
                         max_window_binaries=60).run(state)
    assert out.plan is not None and "windows" in out.plan.solver.detail
    return out.plan.to_json()


def test_a_decomposed_plan_is_byte_identical_beside_two_busy_processes() -> None:
    quiet = _plan_json()
    with busy(2):
        loaded = _plan_json()
    assert strip_wall(quiet) == strip_wall(loaded)
    assert json.loads(quiet)["warnings"] == []  # no guard fired: nothing depended on timing


@pytest.mark.parametrize("backend, workers", [("cpsat", 2), ("scip", 1)])
def test_other_backends_are_deterministic_too(backend: str, workers: int) -> None:
    assert strip_wall(_plan_json(backend, workers)) == strip_wall(_plan_json(backend, workers))


def test_solve_parameters_carry_the_work_limit_and_the_guard() -> None:
    budget = WorkBudget(WINDOW_NODE_LIMIT, 2.0, 7.0)
    highs = solve_parameters("highs", 3, 4, budget)
    assert highs.node_limit == WINDOW_NODE_LIMIT and highs.time_limit.total_seconds() == 7.0
    assert highs.highs.int_options["threads"] == 1 and highs.highs.int_options["random_seed"] == 3
    cpsat = solve_parameters("cpsat", 3, 4, budget)
    assert cpsat.cp_sat.max_deterministic_time == 2.0 and cpsat.cp_sat.interleave_search
    assert cpsat.threads == 4
