"""Property tests: random JAX programs on random targets; every plan of every strategy verifies,
mip is never worse than greedy, and greedy never worse than naive under the same fusion."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tests.passes.helpers import strip_wall
from tiermap.errors import InfeasiblePlacementError
from tiermap.frontend.lowering import lower
from tiermap.hardware.target import Link, Target, Tier
from tiermap.ir.program import Program
from tiermap.passes.liveness import compute_liveness
from tiermap.passes.verify import verify_plan
from tiermap.pipeline import plan

OPS = ("add", "mul", "tanh", "exp", "matmul", "rowsum", "transpose", "max", "reshape")
TOL = 1e-9


def _build(n: int, num_inputs: int, recipe: list[tuple[str, int, int]]) -> Callable[..., Any]:
    def fn(*xs: jax.Array) -> tuple[jax.Array, jax.Array]:
        vals = list(xs)
        for kind, i, j in recipe:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            if kind == "add":
                v = a + b
            elif kind == "mul":
                v = a * b
            elif kind == "tanh":
                v = jnp.tanh(a)
            elif kind == "exp":
                v = jnp.exp(-a * a)
            elif kind == "matmul":
                v = a @ b
            elif kind == "rowsum":
                v = a - a.sum(axis=1, keepdims=True)
            elif kind == "transpose":
                v = a.T + b
            elif kind == "reshape":  # reshapes tie their result to their operand's tier
                v = jnp.tanh(a.reshape(n // 2, 2 * n)).reshape(n, n) + b
            else:
                v = jnp.maximum(a, b)
            vals.append(v)
        return vals[-1], vals[len(xs) + len(recipe) // 2]

    return fn


@st.composite
def programs(draw: st.DrawFn) -> Program:
    n = draw(st.sampled_from([16, 32, 64, 128]))
    num_inputs = draw(st.integers(1, 3))
    recipe = draw(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50),
                                     st.integers(0, 50)), min_size=1, max_size=7))
    spec = jax.ShapeDtypeStruct((n, n), jnp.float32)
    fn = _build(n, num_inputs, recipe)
    if draw(st.booleans()):  # a training step: forward activations wait for the backward pass
        forward = fn

        def loss(*xs: jax.Array) -> jax.Array:
            a, b = forward(*xs)
            return jnp.tanh(a).sum() + (b * b).sum()

        fn = jax.value_and_grad(loss, argnums=tuple(range(num_inputs)))
    return lower(fn, *([spec] * num_inputs), platform="tpu")


@st.composite
def targets(draw: st.DrawFn, prog: Program) -> Target:
    peak = max(compute_liveness(prog).peak_live_bytes, 1)
    inputs = sum(prog.values[v].nbytes for v in prog.inputs)
    num = draw(st.integers(2, 3))
    tiers = []
    bw = draw(st.floats(1e11, 1e13))
    for i in range(num - 1):
        frac = draw(st.floats(0.1, 1.2))
        # the fastest tier keeps at least 16 KiB: the tiling pass needs room for a tile
        least = 16384 if i == 0 else 64
        tiers.append(Tier(f"t{i}", max(int(frac * peak), least), bw,
                          bw * draw(st.floats(0.5, 1))))
        bw /= draw(st.floats(1.0, 50.0))
    tiers.append(Tier(f"t{num - 1}", 2 * peak + 4096, bw, bw))  # holds everything
    if draw(st.booleans()):  # a read-only tier for inputs, at a random position
        flash = Tier("flash", 2 * inputs + 64, draw(st.floats(1e9, 1e12)), 1e6, read_only=True)
        tiers.insert(draw(st.integers(1, len(tiers))), flash)
    links = ()
    if draw(st.booleans()):
        links = (Link(tiers[0].name, tiers[-1].name, draw(st.floats(1e9, 1e12))),)
    return Target(name="random", description="hypothesis target", platform="tpu",
                  peak_flops_per_s={"f32": draw(st.floats(1e11, 1e14))}, units=1,
                  tiers=tuple(tiers), links=links,
                  op_overhead_s=draw(st.sampled_from([0.0, 1e-8, 1e-6])))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_strategy_verifies_and_mip_le_greedy_le_naive(data: st.DataObject) -> None:
    prog = data.draw(programs())
    target = data.draw(targets(prog))
    fusion = data.draw(st.booleans())
    plans = {}
    for strategy in ("naive", "greedy", "mip"):
        note(f"strategy {strategy}, fusion {fusion}")
        try:
            plans[strategy] = plan(prog, target=target, strategy=strategy, time_limit_s=2,
                                   fusion=fusion)
        except InfeasiblePlacementError as exc:
            assert "tensor" in str(exc) or "step" in str(exc)
            event(f"{strategy} infeasible")
            continue
        event(f"{strategy} {plans[strategy].solver.status}")
        if plans[strategy].transfers:
            event(f"{strategy} moves tensors")
        verify_plan(plans[strategy], prog)
    if "greedy" in plans and "mip" in plans:
        assert plans["mip"].predicted_time_s <= plans["greedy"].predicted_time_s * (1 + TOL)
        assert plans["mip"].baselines["greedy"] == plans["greedy"].predicted_time_s
    if "mip" in plans and not fusion:
        # the mip strategy also weighs greedy's placement after the same re-spreading
        from tiermap.costmodel.evaluate import evaluate
        from tiermap.placement.baselines import greedy_assignment
        from tiermap.placement.problem import PlacementProblem

        problem = PlacementProblem(prog, target, pin=True)
        residency, transfers = problem.to_plan_parts(greedy_assignment(problem), respread=True)
        spread_s = evaluate(prog, target, residency, transfers).predicted_time_s
        assert plans["mip"].predicted_time_s <= spread_s * (1 + TOL)
    if "naive" in plans and "greedy" in plans and not fusion:
        # greedy starts from naive's placement and only makes moves that pay
        assert plans["greedy"].predicted_time_s <= plans["naive"].predicted_time_s * (1 + TOL)
    if "naive" in plans:
        for other in ("greedy", "mip"):
            assert other in plans  # whatever naive places, the others place too


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_planning_is_deterministic(data: st.DataObject) -> None:
    prog = data.draw(programs())
    target = data.draw(targets(prog))
    try:
        first = plan(prog, target=target, strategy="mip", time_limit_s=5)
    except InfeasiblePlacementError:
        return
    again = plan(prog, target=target, strategy="mip", time_limit_s=5)
    if first.solver.status == "optimal":
        assert strip_wall(first.to_json()) == strip_wall(again.to_json())


def _stretched(problem: Any, assignment: dict[str, Any]) -> dict[str, Any]:
    """`assignment` with every move given its longest window option (the one whose transfer
    run is most often shorter than the window)."""
    from tiermap.placement.segments import Choice

    out = {}
    for vid, c in assignment.items():
        seg = problem.segments[vid]
        ev, pf = list(c.evict_opt), list(c.prefetch_opt)
        for g, gap in enumerate(seg.gaps):
            for evict, opts, run in ((True, ev, gap.prev_run), (False, pf, gap.next_run)):
                if run is None:
                    continue
                src, dst = ((c.runs[run], c.gaps[g]) if evict else (c.gaps[g], c.runs[run]))
                if src == dst or problem.read_only[dst]:
                    continue
                options = problem.window_options(seg, g, src, dst, evict)
                opts[g] = max(range(len(options)), key=lambda o: options[o])
        out[vid] = Choice(c.runs, c.gaps, c.home, tuple(ev), tuple(pf))
    return out


def _model_time_s(problem: Any, assignment: dict[str, Any]) -> tuple[float, float]:
    """(the placement MIP's optimum over the whole program with every binary fixed at
    `assignment`, the cost model's time of `assignment`)."""
    from ortools.math_opt.python import mathopt

    from tiermap.placement.cost_state import CostState
    from tiermap.placement.mip import _free_tensors
    from tiermap.placement.mip_model import _WindowModel

    n = problem.num_steps
    free = _free_tensors(problem, 0, n - 1)
    state = CostState(problem, assignment)
    total_s = state.total_time_s()
    for vid in free:
        state.remove(vid)
    model = _WindowModel(problem, state, assignment, free, 0, n - 1, "highs", None)
    for var, value in model.hint_values.items():
        model.var_lb[var] = model.var_ub[var] = value
    fixed = model._export("fixed", [(v, 1.0) for v in model.T.values()])
    result = mathopt.solve(fixed, mathopt.SolverType.HIGHS)
    assert result.termination.reason == mathopt.TerminationReason.OPTIMAL
    for vid in free:
        state.add(vid, assignment[vid])
    modelled = np.array(sorted(model.T), dtype=np.int64)
    rest_s = total_s - float(state.step_times(modelled).sum())
    return result.objective_value() * model.time_unit_s + rest_s, total_s


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_mip_model_is_exact_for_the_greedy_plan(data: st.DataObject) -> None:
    """The placement MIP over the whole program, with every binary fixed at greedy's choice, is
    feasible and its optimum is greedy's predicted time: the model charges what the cost model
    charges, occupancy included (so greedy's plan is a feasible warm start of every window).
    Likewise with every move stretched to its longest window, where it fits."""
    from tiermap.placement.baselines import greedy_assignment
    from tiermap.placement.cost_state import CostState
    from tiermap.placement.problem import PlacementProblem

    prog = data.draw(programs())
    target = data.draw(targets(prog))
    problem = PlacementProblem(prog, target, pin=False)
    try:
        greedy = greedy_assignment(problem)
    except InfeasiblePlacementError:
        return
    event("moves" if any(problem.layout(problem.segments[v], c)[1] for v, c in greedy.items())
          else "no moves")
    model_s, cost_s = _model_time_s(problem, greedy)
    assert model_s == pytest.approx(cost_s, rel=1e-6)
    stretched = _stretched(problem, greedy)
    if stretched != greedy and CostState(problem, stretched).within_capacity():
        event("stretched windows")
        model_s, cost_s = _model_time_s(problem, stretched)
        assert model_s == pytest.approx(cost_s, rel=1e-6)
