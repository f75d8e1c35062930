"""Loop trip counts: lax.scan and fori_loop give static counts; others are assumed 1 trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import tiermap
from tests import zoo
from tests.frontend.helpers import assert_flops_agree, check_invariants, xla_flops
from tiermap.ir.program import Op, Program

f32 = jnp.float32


def _loops(program: Program) -> list[Op]:
    return [op for op in program.walk() if op.kind == "stablehlo.while"]


def test_scan_trip_count_is_its_length() -> None:
    fn, args = zoo.scan_rnn(steps=16, batch=8, width=64)
    program = tiermap.lower(fn, *args)
    (loop,) = _loops(program)
    assert loop.trip_count == 16
    per_trip = 2 * 8 * 64 * 64 + 8 * 64  # matmul + add; tanh is a transcendental
    assert loop.flops == pytest.approx(16 * (per_trip + 2))  # + counter add + compare
    assert loop.transcendentals == 16 * 8 * 64
    assert program.flops_one_trip == pytest.approx(per_trip + 2)
    check_invariants(program)
    assert_flops_agree(program, xla_flops(jax.jit(fn).lower(*args)), "scan")


def test_fori_loop_trip_count() -> None:
    fn, args = zoo.fori_power(trips=10, n=32)
    program = tiermap.lower(fn, *args)
    (loop,) = _loops(program)
    assert loop.trip_count == 10
    assert loop.flops == pytest.approx(10 * (2 * 32 * 32 * 4 + 2))
    assert_flops_agree(program, xla_flops(jax.jit(fn).lower(*args)), "fori")


def test_fori_loop_with_offset_and_stride_shape() -> None:
    def f(x: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(3, 17, lambda i, y: y * 2.0 + 1.0, x)

    program = tiermap.lower(f, jax.ShapeDtypeStruct((8,), f32))
    (loop,) = _loops(program)
    assert loop.trip_count == 14


def test_nested_scans_multiply_and_xla_counts_each_body_once() -> None:
    def f(w: jax.Array, xs: jax.Array) -> jax.Array:
        def outer(h: jax.Array, x: jax.Array) -> tuple[jax.Array, None]:
            def inner(g: jax.Array, _: None) -> tuple[jax.Array, None]:
                return jnp.sin(g @ w), None

            g, _ = jax.lax.scan(inner, h + x, None, length=4)
            return g, None

        h, _ = jax.lax.scan(outer, jnp.zeros((2, 16)), xs)
        return h

    args = (jax.ShapeDtypeStruct((16, 16), f32), jax.ShapeDtypeStruct((3, 2, 16), f32))
    program = tiermap.lower(f, *args)
    outer_loop = next(op for op in program.ops if op.kind == "stablehlo.while")
    inner_loop = next(op for op in outer_loop.body if op.kind == "stablehlo.while")
    assert (outer_loop.trip_count, inner_loop.trip_count) == (3, 4)
    inner_once = inner_loop.flops / 4
    assert inner_once >= 2 * 2 * 16 * 16
    assert program.flops > 3 * 4 * 2 * 2 * 16 * 16
    assert program.flops_one_trip < program.flops / 10
    check_invariants(program)
    assert_flops_agree(program, xla_flops(jax.jit(f).lower(*args)), "nested scan")


def test_data_dependent_while_is_assumed_one_trip_and_recorded() -> None:
    def f(x: jax.Array) -> jax.Array:
        return jax.lax.while_loop(lambda y: jnp.sum(y) < 100.0, lambda y: y * 2.0, x)

    program = tiermap.lower(f, jax.ShapeDtypeStruct((8,), f32))
    (loop,) = _loops(program)
    assert loop.trip_count == 1
    assert any(loop.id in a and "not static" in a for a in program.assumptions)


def test_traced_fori_bound_is_assumed_one_trip() -> None:
    def f(n: jax.Array, x: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, n, lambda i, y: y + 1.0, x)

    program = tiermap.lower(f, jax.ShapeDtypeStruct((), jnp.int32),
                            jax.ShapeDtypeStruct((8,), f32))
    (loop,) = _loops(program)
    assert loop.trip_count == 1
    assert any("not static" in a for a in program.assumptions)


def test_loop_body_values_live_in_body_values() -> None:
    fn, args = zoo.scan_rnn(steps=4)
    program = tiermap.lower(fn, *args)
    (loop,) = _loops(program)
    for op in loop.body:
        for vid in op.outputs:
            assert vid in program.body_values and vid not in program.values
    args_ids = [vid for region in loop.attrs["region_args"] for vid in region]
    assert all(program.body_values[vid].producer_step == -1 for vid in args_ids)
