"""The driver: argument checks, lowering, baselines, determinism."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from tests.passes.helpers import MIB, program, strip_wall, two_tier
from tiermap.errors import ChoiceError, TiermapError
from tiermap.ir.plan import Plan
from tiermap.pipeline import build_passes, plan


def _fn(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.tanh(x @ w).sum(axis=0)


ARGS = (jax.ShapeDtypeStruct((64, 128), jnp.float32), jax.ShapeDtypeStruct((128, 256),
                                                                          jnp.float32))


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("strategy", "best", "strategy='best' is not one of: mip, greedy, naive"),
    ("objective", "speed", "objective='speed' is not one of: time, energy"),
    ("backend", "gurobi", "backend='gurobi' is not one of: highs, scip, cpsat"),
    ("time_limit_s", 0, "time_limit_s=0: expected a positive"),
    ("time_limit_s", -1.0, "time_limit_s=-1.0"),
    ("time_limit_s", math.nan, "time_limit_s=nan"),
    ("seed", -3, "seed=-3"),
    ("workers", 0, "workers=0"),
])
def test_bad_options_are_rejected_listing_the_choices(option: str, value: object,
                                                      needle: str) -> None:
    with pytest.raises(ChoiceError) as info:
        plan(_fn, *ARGS, target="h100", **{option: value})  # type: ignore[arg-type]
    assert needle in str(info.value)
    assert isinstance(info.value, TiermapError)


def test_energy_needs_energy_figures_on_the_target() -> None:
    with pytest.raises(ChoiceError, match="energy_pj_per_byte.*lacks it on smem|hbm"):
        plan(_fn, *ARGS, target="h100", objective="energy")


def test_a_program_takes_no_example_arguments() -> None:
    prog = program({"a": 8, "b": 8}, ["a"], [(["a"], ["b"], 0.0)], ["b"])
    with pytest.raises(ChoiceError, match="no example arguments"):
        plan(prog, 1, target=two_tier(MIB))


def test_plan_of_a_jax_function_carries_program_baselines_and_bound() -> None:
    p = plan(_fn, *ARGS, target="h100", time_limit_s=5)
    assert isinstance(p, Plan)
    assert p.program is not None and p.program.num_steps == p.num_steps
    assert set(p.baselines) == {"naive", "greedy"}
    assert p.lower_bound_s <= p.predicted_time_s <= min(p.baselines.values()) * (1 + 1e-9)
    assert p.solver.backend == "highs" and p.solver.seed == 0
    # the MIP's guard is the 5 s (less of it is left under the deadline); the plan reports 5
    assert p.solver.time_limit_s == 5
    assert p.solver.workers == 1  # HiGHS's MIP search is serial
    greedy = plan(_fn, *ARGS, target="h100", strategy="greedy")
    assert set(greedy.baselines) == {"naive"}
    naive = plan(_fn, *ARGS, target="h100", strategy="naive")
    assert naive.baselines == {}
    assert all(o.fusion_group is None for o in naive.ops)


def test_same_input_gives_byte_identical_json_apart_from_wall_times() -> None:
    runs = [plan(_fn, *ARGS, target="sn40l", time_limit_s=5) for _ in range(2)]
    assert strip_wall(runs[0].to_json()) == strip_wall(runs[1].to_json())
    texts = [r.to_json() for r in runs]
    assert texts[0].count("wall") == texts[1].count("wall")


def test_pass_list_is_schedule_liveness_fusion_recompute_place_verify() -> None:
    names = [p.name for p in build_passes("mip")]
    assert names == ["schedule", "liveness", "fuse", "tile", "recompute", "place-tiers",
                     "verify"]
    assert [p.name for p in build_passes("naive")] == ["schedule", "liveness", "place-tiers",
                                                       "verify"]
    assert [p.name for p in build_passes("mip", fusion=False)] == [
        "schedule", "liveness", "recompute", "place-tiers", "verify"]
    assert [p.name for p in build_passes("mip", recompute="off")] == [
        "schedule", "liveness", "fuse", "tile", "place-tiers", "verify"]


def test_max_sweeps_must_be_a_positive_integer() -> None:
    from tiermap.placement.place_tiers import PlaceTiersPass

    with pytest.raises(ChoiceError, match="max_sweeps=0: expected a positive integer"):
        PlaceTiersPass(max_sweeps=0)
    assert PlaceTiersPass(max_sweeps=4).max_sweeps == 4
