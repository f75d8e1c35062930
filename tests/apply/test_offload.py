"""Host offload of intermediates: the plan's moves to host and back are placements in the applied
program (kept as `annotate_device_placement` in an export for CUDA), the numbers stay jax.jit's,
and every plan decision is listed as applied or not with the reason."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiermap
from tiermap.apply import applied_decisions, apply_plan
from tiermap.apply.jaxpr import inline_calls
from tiermap.apply.offload import (
    count_host_placements,
    host_moves,
    host_tiers,
    kept_input_positions,
    tensor_map,
)
from tiermap.examples import models
from tiermap.ir.plan import occupancy_bytes
from tiermap.sweep import with_capacity

REPO = Path(__file__).resolve().parents[2]
H100_4G = REPO / "benchmarks" / "targets" / "h100-4g.toml"
SMALL = {"layers": 1, "d_model": 64, "heads": 2, "seq": 64, "batch": 4, "vocab": 128}


def real_args(args: tuple, seed: int = 0) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    key = jax.random.key(seed)
    vals = []
    for i, s in enumerate(leaves):
        k = jax.random.fold_in(key, i)
        if jnp.issubdtype(s.dtype, jnp.integer):
            vals.append(jax.random.randint(k, s.shape, 0, SMALL["vocab"], s.dtype))
        else:
            vals.append((0.02 * jax.random.normal(k, s.shape)).astype(s.dtype))
    return jax.tree.unflatten(tree, vals)


@pytest.fixture(scope="module")
def starved() -> tuple:
    """A 1-layer GPT training step planned on h100-4g with its HBM cut to half the step's peak
    (the test-sized model fits 4 GiB many times over), so that the plan moves activations to
    host and back."""
    fn, args = models.transformer_train(**SMALL)
    target = tiermap.target(str(H100_4G))
    unlimited = tiermap.plan(fn, *args, target=target, strategy="greedy")
    peak = max(occupancy_bytes(unlimited)["hbm"])
    plan = tiermap.plan(fn, *args, target=with_capacity(target, "hbm", peak // 2),
                        recompute="off")  # moves to host, not recomputation, under test
    return fn, args, plan


def _intermediate_moves(plan) -> dict[str, int]:
    """Tensor → number of its host-bound moves, for tensors that are not program inputs."""
    inputs = set(plan.program.inputs)
    host = host_tiers(plan)
    return {tid: sum(1 for m in moves if m.dst in host)
            for tid, moves in host_moves(plan).items() if tid not in inputs}


def test_plan_moves_intermediates_to_host(starved) -> None:
    _, _, plan = starved
    moves = _intermediate_moves(plan)
    assert moves, "the starved plan should evict activations to host"
    for tid, tmoves in host_moves(plan).items():
        t = plan.tensor(tid)
        for m in tmoves:
            if m.src:  # a move made in chunks is merged into one whole move
                assert m.nbytes == t.nbytes, (tid, m)


def test_applied_program_places_every_move_and_matches_jax_jit(starved) -> None:
    fn, args, plan = starved
    applied = apply_plan(fn, plan)
    vals = real_args(args)
    out, ref = applied(*vals), jax.jit(fn)(*vals)
    for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-4, rtol=0)
    moves = _intermediate_moves(plan)
    listed = {d.subject: d for d in applied.decisions if d.kind == "offload"}
    assert set(moves) <= set(listed), "every host move of an intermediate is listed"
    applied_moves = sum(n for tid, n in moves.items() if listed[tid].applied)
    assert applied_moves == sum(moves.values()), [d for d in listed.values() if not d.applied]
    exported = jax.export.export(jax.jit(applied), platforms=["cuda"])(*vals).mlir_module()
    # At least one host placement per host-bound move of an intermediate.
    assert count_host_placements(exported, intermediates_only=True) >= sum(moves.values())
    plain = jax.export.export(jax.jit(fn), platforms=["cuda"])(*vals).mlir_module()
    assert count_host_placements(plain) == 0


def test_gradients_through_the_applied_step_match(starved) -> None:
    fn, args, plan = starved
    applied = apply_plan(fn, plan)
    params, tokens, targets = real_args(args, seed=1)

    def loss(f):
        return lambda p: f(p, tokens, targets)[1]

    g_a = jax.jit(jax.grad(loss(applied)))(params)
    g_r = jax.jit(jax.grad(loss(fn)))(params)
    for a, r in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_r), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-4, rtol=0)


def test_decisions_cover_attention_and_host_inputs(starved) -> None:
    fn, args, plan = starved
    decisions = applied_decisions(fn, plan, *args)
    kinds = {d.kind for d in decisions}
    assert "attention" in kinds and "offload" in kinds
    groups = {d.subject for d in decisions if d.kind == "attention"}
    assert {a.group for a in plan.attention} <= groups
    for d in decisions:
        assert d.detail, d
        if not d.applied:
            assert "not applied" in d.detail or "left to XLA" in d.detail, d


def test_tensor_map_names_equations_and_what_it_cannot_map() -> None:
    def f(x, w):
        y = jnp.sin(x @ w)
        return (y ** 3).sum(), jnp.cos(y)

    spec = (jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 16),
                                                                              jnp.float32))
    plan = tiermap.plan(f, *spec, target="h100")
    leaves = list(spec)
    closed = inline_calls(jax.make_jaxpr(f)(*leaves))
    tmap = tensor_map(plan, closed.jaxpr, closed.consts)
    assert not tmap.failure
    eqns = closed.jaxpr.eqns
    sin_idx = next(i for i, e in enumerate(eqns) if e.primitive.name == "sin")
    sin_op = next(op for op in plan.program.ops if op.kind == "stablehlo.sine")
    assert tmap.where[sin_op.outputs[0]] == (sin_idx, 0)
    assert tmap.where[plan.program.inputs[1]] == (-1, 1)
    # y ** 3 lowers to two multiplies: the first one's result is no jaxpr variable.
    inner = [vid for vid, why in tmap.why_not.items() if "integer_pow" in why]
    assert inner, tmap.why_not


def test_lowered_decisions_and_report(tmp_path) -> None:
    fn, args = models.transformer_train(layers=1, d_model=64, heads=2, seq=64, batch=2,
                                        vocab=128)
    lowered = tiermap.jit(fn, target="h100").lower(*args)
    decisions = lowered.decisions()
    assert decisions and all(d.kind == "attention" for d in decisions), decisions
    assert all(d.applied for d in decisions)
    text = lowered.plan().report(decisions)
    assert "## Plan decisions as applied" in text
    assert f"`{decisions[0].subject}`" in text


def test_inputs_map_through_the_leaves_jax_jit_keeps() -> None:
    def f(unused, x, w):
        return jax.nn.relu(x @ w)

    spec = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((3,), (8, 16), (16, 16))]
    plan = tiermap.plan(f, *spec, target="h100")
    assert len(plan.program.inputs) == 2  # jax.jit leaves the unused argument out
    closed = inline_calls(jax.make_jaxpr(f)(*spec))
    assert kept_input_positions(closed.jaxpr, 2) == [1, 2]
    tmap = tensor_map(plan, closed.jaxpr, closed.consts)
    assert tmap.where[plan.program.inputs[0]] == (-1, 1)
    # relu is a custom_jvp call: its max is mapped to that equation, not lost to its own scope.
    relu = next(i for i, e in enumerate(closed.jaxpr.eqns)
                if e.primitive.name == "custom_jvp_call")
    top = next(op for op in plan.program.ops if op.kind == "stablehlo.maximum")
    assert tmap.where[top.outputs[0]] == (relu, 0)


def test_a_read_from_host_and_an_output_written_there_get_copies_to_device() -> None:
    """A plan edited by hand: `a` is evicted after its first reader and read again with no
    prefetch (the plan lets that read go to host); the output is written straight into host."""
    import dataclasses

    from tiermap.ir.plan import Residency, Transfer

    def f(x, w):
        a = jnp.sin(x @ w)
        c = jnp.cos(a) @ w
        return jnp.tanh(c) + a

    spec = [jax.ShapeDtypeStruct((32, 32), jnp.float32)] * 2
    plan = tiermap.plan(f, *spec, target=str(H100_4G))
    program = plan.program
    sin_op = next(op for op in program.ops if op.kind == "stablehlo.sine")
    cos_op = next(op for op in program.ops if op.kind == "stablehlo.cosine")
    a, out = sin_op.outputs[0], program.outputs[0]
    last = program.num_steps - 1
    tensors = []
    for t in plan.tensors:
        if t.id == a:
            t = dataclasses.replace(t, residency=(Residency("hbm", t.producer_step, cos_op.step),
                                                  Residency("host", cos_op.step,
                                                            t.last_use_step)))
        elif t.id == out:
            t = dataclasses.replace(t, residency=(Residency("host", t.producer_step, last),))
        tensors.append(t)
    move = Transfer(a, "hbm", "host", cos_op.step, cos_op.step, plan.tensor(a).nbytes)
    edited = dataclasses.replace(plan, tensors=tuple(tensors), transfers=(move,))
    assert set(host_moves(edited)) == {a, out}
    applied = apply_plan(f, edited)
    x, w = (jax.random.normal(jax.random.key(i), (32, 32)) for i in range(2))
    np.testing.assert_allclose(np.asarray(applied(x, w)), np.asarray(jax.jit(f)(x, w)),
                               atol=1e-5)
    done = {d.subject: d for d in applied.decisions if d.kind == "offload"}
    assert done[a].applied and "to device for a read" in done[a].detail, done[a]
    assert done[out].applied and "written to host" in done[out].detail, done[out]
    text = jax.export.export(jax.jit(applied), platforms=["cuda"])(x, w).mlir_module()
    assert count_host_placements(text, intermediates_only=True) == 2
