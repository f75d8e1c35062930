"""The fidelity check's parts: its suites, statistics, kernel forming and prediction."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from tiermap.costmodel import fidelity
from tiermap.costmodel.fidelity_suites import SUITES, Case, suite
from tiermap.errors import ChoiceError
from tiermap.frontend.lowering import lower
from tiermap.hardware import load_target


def test_suites_are_distinct_and_big_enough() -> None:
    blind, tuned = suite("blind"), suite("tuned")
    assert len(blind) >= 15 and len(tuned) == 24 and len(suite("smoke")) == 3
    assert len({c.label for c in blind}) == len(blind)
    assert not {c.label for c in blind} & {c.label for c in tuned}
    assert set(SUITES) == {"blind", "tuned", "smoke"}
    with pytest.raises(ChoiceError, match="unknown fidelity suite 'nope'"):
        suite("nope")


def test_spearman_by_hand() -> None:
    assert fidelity.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert fidelity.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4) against (1, 3, 2, 4): 1 - 6 x 2 / (4 x 15) = 0.8
    assert fidelity.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert fidelity.ranks([5.0, 1.0, 5.0]) == [2.5, 1.0, 2.5]
    assert math.isnan(fidelity.spearman([1.0], [2.0]))


def test_stats_and_goals() -> None:
    cases = [Case("op", str(i), lambda x: x, (((4,), "float32"),)) for i in range(4)]
    s = fidelity.stats(cases, [1.0, 2.0, 4.0, 11.0], [1.0, 2.0, 4.0, 5.0])
    assert s.median_abs_log2 == 0.0 and s.spearman == pytest.approx(1.0)
    assert s.worst == "op 3" and s.worst_log2 == pytest.approx(math.log2(11 / 5))
    assert s.over_2x == 1 and not s.meets()  # 2.2x off
    assert fidelity.stats(cases, [1.0, 2.0, 4.0, 9.0], [1.0, 2.0, 4.0, 5.0]).meets()


def test_xla_like_kernels_of_a_softmax() -> None:
    import jax
    import jax.numpy as jnp

    program = lower(lambda x: jax.nn.softmax(x, axis=-1),
                    jax.ShapeDtypeStruct((64, 256), jnp.float32))
    fusion = fidelity.xla_like_fusion(program)
    # max-reduce | subtract, exp, sum-reduce | divide: each run cut after its reduce
    reduces = [o.id for o in program.ops if o.kind == "stablehlo.reduce"]
    groups = {g.id: g for g in fusion.groups}
    of = fusion.group_of()
    assert len(reduces) == 2 and of[reduces[0]].id != of[reduces[1]].id
    assert len(groups) == 3


def test_predict_is_the_sum_of_its_kernels_and_the_smoke_check_runs() -> None:
    target = replace(load_target("cpu"), working_set_tiers=True)
    cases = suite("smoke")
    preds = fidelity.predict_cases(cases, target)
    assert all(p.time_s > 0 and p.kernels >= 1 for p in preds)
    assert preds[0].bound in ("compute", "memory")
    result = fidelity.check(target, cases, suite="smoke", rounds=1, repeats=2, quiet=False)
    assert [p.time_s for p in result.predictions] == [p.time_s for p in preds]
    assert len(result.measured_s) == 2 and all(len(r) == 3 for r in result.measured_s)
    assert all(t > 0 for run in result.measured_s for t in run)
    assert len(result.stats) == 2
