"""Loops planned as steady states: bodies cut out with their roles, planned once, priced around,
verified, written in the v2 plan JSON, and the decorated programs match jax.jit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiermap
from tiermap.errors import ChoiceError, PassError
from tiermap.examples.models import transformer_train
from tiermap.frontend.lowering import lower
from tiermap.ir.loops import loop_body
from tiermap.passes.verify import verify_plan

ROOT = Path(__file__).resolve().parents[2]


def _rnn(ws: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    def body(h: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        h2 = jnp.tanh(h @ w)
        return h2, h2.sum(0)

    return jax.lax.scan(body, x, ws)


WS = jnp.ones((4, 32, 32), jnp.float32) * 0.05
X = jnp.ones((8, 32), jnp.float32)


def _bodies(fn: Any, *args: Any) -> list[Any]:
    program = lower(fn, *args)
    return [b for op in program.ops if (b := loop_body(program, op)) is not None]


def test_scan_body_roles() -> None:
    (body,) = _bodies(_rnn, WS, X)
    assert body.roles == ("xs", "counter", "carry", "ys")
    assert body.trips == 4 and body.static_trips
    # The body reads one [1, 32, 32] slice and writes one [1, 32] slice per iteration.
    (slice_id,) = body.slice_inputs
    assert body.program.values[slice_id].shape == (1, 32, 32)
    assert body.program.values[body.operand_outputs[3]].shape == (1, 32)
    assert not any(o.kind == "stablehlo.dynamic_slice" for o in body.program.ops)


def test_transposed_scan_reads_stacked_residuals() -> None:
    grad = jax.grad(lambda ws, x: _rnn(ws, x)[0].sum())
    bodies = _bodies(grad, WS, X)
    assert len(bodies) == 2
    backward = bodies[1]
    # The backward loop reads the residual stacks slice by slice (its index is n - 1 - i).
    assert backward.roles.count("xs") >= 2 and "ys" in backward.roles


def test_fori_loop_carries_and_nested_scan() -> None:
    def nested(x: jax.Array) -> jax.Array:
        def outer(c: jax.Array, _: Any) -> tuple[jax.Array, None]:
            inner = jax.lax.scan(lambda d, _: (jnp.sin(d) @ jnp.ones((16, 16)), None), c,
                                 None, length=3)[0]
            return inner, None

        return jax.lax.scan(outer, x, None, length=2)[0]

    (body,) = _bodies(nested, jnp.ones((4, 16)))
    assert body.roles.count("carry") == 1 and body.trips == 2
    inner = [b for op in body.program.ops if (b := loop_body(body.program, op)) is not None]
    assert len(inner) == 1 and inner[0].trips == 3
    plan = tiermap.plan(nested, jnp.ones((4, 16)), target="h100", time_limit_s=5)
    (loop,) = plan.loops
    assert len(loop.body.loops) == 1 and loop.body.loops[0].trips == 3


@pytest.mark.parametrize("target", ["sn40l", "h100"])
def test_scan_plan_verifies_and_round_trips(target: str) -> None:
    plan = tiermap.plan(_rnn, WS, X, target=target, time_limit_s=5)
    (loop,) = plan.loops
    assert loop.trips == 4 and loop.body.num_steps > 0
    assert loop.time_s == pytest.approx(loop.prologue_s + 4 * loop.iteration_s + loop.epilogue_s)
    assert plan.predicted_time_s >= plan.lower_bound_s
    plan.verify()
    text = plan.to_json()
    data = json.loads(text)
    assert data["schema"] == "tiermap.plan/v2" and data["loops"][0]["trips"] == 4
    again = tiermap.Plan.from_json(text)
    assert again.to_json() == text
    # A v1 plan (before loops) is still read.
    data["schema"] = "tiermap.plan/v1"
    del data["loops"]
    old = tiermap.Plan.from_json(json.dumps(data))
    assert old.loops == () and old.num_steps == plan.num_steps


def test_verifier_catches_a_mispriced_loop() -> None:
    plan = tiermap.plan(_rnn, WS, X, target="h100", time_limit_s=5)
    (loop,) = plan.loops
    cheap = dataclasses.replace(loop, iteration_s=loop.iteration_s / 2,
                                time_s=loop.prologue_s + 2 * loop.iteration_s + loop.epilogue_s)
    with pytest.raises(PassError, match="loop"):
        verify_plan(dataclasses.replace(plan, loops=(cheap,)))
    small = dataclasses.replace(loop, reserved_bytes={k: 0 for k in loop.reserved_bytes})
    with pytest.raises(PassError, match="reserves"):
        verify_plan(dataclasses.replace(plan, loops=(small,)))
    wrong_bound = dataclasses.replace(loop, lower_bound_s=loop.lower_bound_s * 3 + 1e-6)
    with pytest.raises(PassError, match="lower bound"):
        verify_plan(dataclasses.replace(plan, loops=(wrong_bound,)))


def test_dynamic_trip_count_is_an_assumption_stated() -> None:
    def until(x: jax.Array) -> jax.Array:
        return jax.lax.while_loop(lambda c: c.sum() < 100.0, lambda c: c * 1.5 + 0.1, x)

    plan = tiermap.plan(until, jnp.ones((8, 8)), target="h100", time_limit_s=5,
                        assumed_trip_count=7)
    (loop,) = plan.loops
    assert loop.trips == 7 and not loop.static_trips
    assert any("assumed_trip_count" in n for n in plan.notes)
    with pytest.raises(ChoiceError):
        tiermap.plan(until, jnp.ones((8, 8)), target="h100", assumed_trip_count=0)


def test_scanned_training_step_against_its_unrolled_twin() -> None:
    """On sn40l (everything fits on chip) the steady state is no worse than the unrolled plan."""
    flat = tiermap.plan(*_args(transformer_train(layers=2, seq=64, batch=2)), target="sn40l",
                        time_limit_s=10)
    loop = tiermap.plan(*_args(transformer_train(layers=2, seq=64, batch=2, scan=True)),
                        target="sn40l", time_limit_s=10)
    assert len(loop.loops) == 2 and {x.trips for x in loop.loops} == {2}
    assert loop.predicted_time_s <= 1.05 * flat.predicted_time_s
    assert loop.num_steps < flat.num_steps / 2


def test_attention_paired_across_the_two_scans() -> None:
    """jax.grad's forward scan and transposed scan share each attention: its forward half runs
    tiled in the first body, its backward half recomputes the scores in the second, and the
    score-shaped residual stacks live in no tier and cost neither loop a byte."""
    plan = tiermap.plan(*_args(transformer_train(layers=2, seq=64, batch=2, scan=True)),
                        target="sn40l", time_limit_s=10)
    forward, backward = plan.loops
    fwd_groups = {o.fusion_group for o in forward.body.ops if o.fusion_group}
    bwd_groups = {o.fusion_group for o in backward.body.ops if o.fusion_group}
    assert any(g.startswith("attn") and not g.endswith("_bwd") for g in fwd_groups)
    assert any(g.startswith("attn") and g.endswith("_bwd") for g in bwd_groups)
    assert any("attention forward in" in n for n in plan.notes)
    by_id = {t.id: t for t in plan.tensors}
    outer = {o.id: o for o in plan.ops}
    dropped = [j for j, b in (forward.result_bytes or {}).items()
               if b == 0 and forward.roles[j] == "ys"]
    assert dropped, "no score stack left unstored"
    for j in dropped:
        stack = by_id[outer[forward.op_id].outputs[j]]
        assert not stack.materialized and stack.residency == ()
    # The backward body never reads the score slices: they are unstored inputs of its program.
    unread = [t for t in backward.body.tensors if t.producer_step < 0 and not t.materialized]
    assert len(unread) >= len(dropped)
    verify_plan(plan)
    # Unpaired (what tiermap.jit plans, since it runs jax.grad's scans as XLA does): the score
    # stacks are stored and streamed, and the plan is no faster.
    kept = tiermap.plan(*_args(transformer_train(layers=2, seq=64, batch=2, scan=True)),
                        target="sn40l", time_limit_s=10, pair_loop_attention=False)
    assert not any("attention forward in" in n for n in kept.notes)
    assert all(b > 0 for b in (kept.loops[0].result_bytes or {}).values())
    assert kept.predicted_time_s >= plan.predicted_time_s * (1 - 1e-9)


def _args(built: tuple[Any, tuple[Any, ...]]) -> tuple[Any, ...]:
    fn, args = built
    return (fn, *args)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
def test_decorated_scan_matches_jit(dtype: Any, tol: float) -> None:
    ws = (jax.random.normal(jax.random.key(0), (3, 32, 32)) * 0.1).astype(dtype)
    x = jax.random.normal(jax.random.key(1), (8, 32)).astype(dtype)

    def step(ws: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        loss, g = jax.value_and_grad(lambda w: _rnn(w, x)[0].astype(jnp.float32).sum())(ws)
        return loss, g

    fast = tiermap.jit(step, target="h100", time_limit_s=5)
    for fn in (_rnn, step):
        want = jax.jit(fn)(ws, x)
        got = (tiermap.jit(fn, target="h100", time_limit_s=5) if fn is _rnn else fast)(ws, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=tol, atol=tol)


# --- random programs with loops -----------------------------------------------------------------


@st.composite
def _loop_programs(draw: st.DrawFn) -> tuple[Any, tuple[jax.Array, ...]]:
    d = draw(st.sampled_from([8, 16]))
    trips = draw(st.integers(1, 4))
    carries = draw(st.integers(1, 3))
    ys_kind = draw(st.sampled_from(["none", "row", "square"]))
    nested = draw(st.booleans())
    under_grad = draw(st.booleans())
    ws = jnp.linspace(-0.1, 0.1, trips * d * d, dtype=jnp.float32).reshape(trips, d, d)
    hs = tuple(jnp.full((4, d), 0.1 * (i + 1), jnp.float32) for i in range(carries))

    def body(c: tuple[jax.Array, ...], w: jax.Array) -> tuple[tuple[jax.Array, ...], Any]:
        first = jnp.tanh(c[0] @ w)
        if nested:
            first = jax.lax.scan(lambda a, _: (jnp.sin(a) + a, None), first, None, length=2)[0]
        new = (first,) + tuple(h * 0.5 + first for h in c[1:])
        y = {"none": None, "row": first.sum(0), "square": w @ w}[ys_kind]
        return new, y

    def fn(ws: jax.Array, *hs: jax.Array) -> Any:
        out, ys = jax.lax.scan(body, tuple(hs), ws)
        total = sum(o.sum() for o in out)
        return total if ys is None else (total, ys)

    if under_grad:
        def grad_fn(ws: jax.Array, *hs: jax.Array) -> Any:
            return jax.grad(lambda w: jax.tree.leaves(fn(w, *hs))[0])(ws)

        return grad_fn, (ws, *hs)
    return fn, (ws, *hs)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(_loop_programs())
def test_random_loop_programs(case: tuple[Any, tuple[jax.Array, ...]]) -> None:
    fn, args = case
    mip = tiermap.plan(fn, *args, target="h100", time_limit_s=5)
    greedy = tiermap.plan(fn, *args, target="h100", strategy="greedy", time_limit_s=5)
    naive = tiermap.plan(fn, *args, target="h100", strategy="naive", time_limit_s=5)
    for p in (mip, greedy, naive):
        assert p.loops, "the scan is planned as a loop"
        p.verify()
    assert mip.predicted_time_s <= greedy.predicted_time_s * (1 + 1e-9)
    assert greedy.predicted_time_s <= naive.predicted_time_s * (1 + 1e-9)
    want = jax.jit(fn)(*args)
    got = tiermap.jit(fn, target="h100", time_limit_s=5)(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_scanned_attention_runs_the_body_plans_tiles() -> None:
    """A scanned attention stack at N = 4096: the applied program tiles the attention inside the
    scan body with the body plan's blocks, and XLA's temporary memory drops at least 10x."""
    n, d, heads, layers = 4096, 64, 2, 2
    stack = _attention_stack(n, d, heads, train=False)
    ws = jax.ShapeDtypeStruct((layers, 3, heads * d, heads * d), jnp.float32)
    x = jax.ShapeDtypeStruct((1, n, heads * d), jnp.float32)
    fast = tiermap.jit(stack, target="h100", time_limit_s=10)
    lowered = fast.lower(ws, x)
    applied = lowered.compile().memory_analysis().temp_size_in_bytes
    plain = jax.jit(stack).lower(ws, x).compile().memory_analysis().temp_size_in_bytes
    assert plain >= 10 * applied, (plain, applied)
    (loop,) = fast.plan(ws, x).loops
    assert loop.body.attention, "the body plan fuses the attention"
    assert any(f"plan group {loop.body.attention[0].group} of loop {loop.op_id}'s body" in note
               for note in lowered.notes), lowered.notes


def _attention_stack(n: int, d: int, heads: int, train: bool = True) -> Any:
    """A causal attention stack scanned over layers, or (`train`) its SGD training step."""
    def stack(ws: jax.Array, x: jax.Array) -> jax.Array:
        def layer(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
            q, k, v = ((h @ w[i]).reshape(1, n, heads, d) for i in range(3))
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d).astype(h.dtype)
            mask = jnp.tril(jnp.ones((n, n), bool))
            p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
            return h + jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(1, n, heads * d), None

        return jax.lax.scan(layer, x, ws)[0]

    def train_step(ws: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        loss, g = jax.value_and_grad(
            lambda w: jnp.sum(stack(w, x).astype(jnp.float32) ** 2))(ws)
        return loss, ws - 1e-3 * g.astype(ws.dtype)

    return train_step if train else stack


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_scanned_attention_training_step_runs_the_paired_kernels(dtype: Any, tol: float) -> None:
    """jax.grad's two scans of an attention stack: the applied program runs the forward kernel
    in the first and its recomputing backward in the second, and matches jax.jit."""
    train = _attention_stack(128, 16, 2)
    ws = (jax.random.normal(jax.random.key(0), (2, 3, 32, 32)) * 0.1).astype(dtype)
    x = jax.random.normal(jax.random.key(1), (1, 128, 32)).astype(dtype)
    fast = tiermap.jit(train, target="h100", time_limit_s=10)
    got, want = fast(ws, x), jax.jit(train)(ws, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)
    lowered = fast.lower(ws, x)
    assert any("split across jax.grad's two scans" in n for n in lowered.notes), lowered.notes
    assert any("attention forward in" in n for n in lowered.plan().notes)
    paired = [d for d in lowered.decisions() if d.kind == "attention" and d.applied]
    assert any("paired across jax.grad's two scans" in d.detail for d in paired), paired


def test_scanned_attention_training_step_memory() -> None:
    """At N = 4096 the paired kernels keep XLA's temporary memory at least 10x below jax.jit's
    (which stacks every layer's probabilities for the backward scan)."""
    train = _attention_stack(4096, 64, 2)
    ws = jax.ShapeDtypeStruct((2, 3, 128, 128), jnp.float32)
    x = jax.ShapeDtypeStruct((1, 4096, 128), jnp.float32)
    lowered = tiermap.jit(train, target="h100", time_limit_s=10).lower(ws, x)
    applied = lowered.compile().memory_analysis().temp_size_in_bytes
    plain = jax.jit(train).lower(ws, x).compile().memory_analysis().temp_size_in_bytes
    assert plain >= 10 * applied, (plain, applied)


def test_a_body_that_does_not_fit_is_planned_again_into_what_is_left() -> None:
    """A starved target (a100-256m with 32 MiB of HBM): the scanned step's forward body cannot
    keep its whole working set beside the enclosing plan, so it is planned again into what that
    plan leaves; the result verifies and its loop prices are the ones the enclosing plan paid."""
    base = tiermap.target(str(ROOT / "benchmarks" / "targets" / "a100-256m.toml"))
    main = base.main_tier.name
    small = dataclasses.replace(base, tiers=tuple(
        dataclasses.replace(t, capacity_bytes=32 * 2**20) if t.name == main else t
        for t in base.tiers))
    plan = tiermap.plan(*_args(transformer_train(layers=4, seq=128, batch=4, scan=True)),
                        target=small, time_limit_s=10)
    assert any("planned again" in n for n in plan.notes), plan.notes
    verify_plan(plan)
