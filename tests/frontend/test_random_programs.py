"""Property test: random compositions of jnp ops lower to IR that keeps the contract, whose FLOPs
agree with XLA's cost analysis, and whose every op can be annotated back onto its StableHLO op."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiermap
from tests.frontend.helpers import assert_flops_agree, check_invariants, round_trip, xla_flops

Array = jax.Array

UNARY: dict[str, Callable[[Array], Array]] = {
    "exp": jnp.exp, "tanh": jnp.tanh, "neg": jnp.negative, "abs": jnp.abs,
    "sqrt": lambda x: jnp.sqrt(jnp.abs(x)), "log1p": lambda x: jnp.log1p(jnp.abs(x)),
    "sin": jnp.sin, "relu": jax.nn.relu, "gelu_tanh": jax.nn.gelu,
    "gelu_erf": lambda x: jax.nn.gelu(x, approximate=False), "sigmoid": jax.nn.sigmoid,
    "square": jnp.square, "rsqrt": lambda x: jax.lax.rsqrt(1.0 + x * x),
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
    "log_softmax": lambda x: jax.nn.log_softmax(x, axis=0),
    "transpose": lambda x: x.T, "cumsum": lambda x: jnp.cumsum(x, axis=-1),
    "sort": lambda x: jnp.sort(x, axis=-1), "scale": lambda x: x * 2.0,
    "plus_one": lambda x: x + 1.0, "times_one": lambda x: x * 1.0, "plus_zero": lambda x: x + 0,
    "clip": lambda x: jnp.clip(x, -1.0, 1.0), "leaky": lambda x: jnp.where(x > 0, x, 0.1 * x),
    "center": lambda x: x - x.mean(-1, keepdims=True),
    "sum_rows": lambda x: x.sum(0, keepdims=True), "max_cols": lambda x: x.max(-1, keepdims=True),
    "var": lambda x: x.var(-1, keepdims=True), "argmax": lambda x: jnp.argmax(x, -1)[:, None]
    .astype(x.dtype),
    "flip": lambda x: x[::-1], "pad": lambda x: jnp.pad(x, ((1, 0), (0, 2))),
    "slice": lambda x: x[:, : max(1, x.shape[1] // 2)],
    "erf": jax.scipy.special.erf, "erfinv": lambda x: jax.scipy.special.erfinv(jnp.tanh(x)),
    "scan3": lambda x: jax.lax.scan(lambda c, _: (jnp.tanh(c) * 2.0, None), x, None,
                                    length=3)[0],
    "fori2": lambda x: jax.lax.fori_loop(0, 2, lambda i, y: y @ jnp.ones((y.shape[1],
                                                                          y.shape[1]),
                                                                         y.dtype), x),
    "cond": lambda x: jax.lax.cond(x.sum() > 0, jnp.exp, lambda y: y * 3.0, x),
}
BINARY: dict[str, Callable[[Array, Array], Array]] = {
    "add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply, "max": jnp.maximum,
    "div": lambda x, y: x / (1.0 + y * y), "where": lambda x, y: jnp.where(x > y, x, y),
    "pow": lambda x, y: jnp.abs(x) ** y,
}
OPS = sorted(UNARY) + sorted(BINARY) + ["matmul", "concat"]


def _apply(name: str, a: Array, b: Array) -> Array:
    if name in UNARY:
        return UNARY[name](a)
    if name == "matmul":
        if a.shape[1] == b.shape[0]:
            return a @ b
        return a @ b.T if a.shape[1] == b.shape[1] else a @ a.T
    if name == "concat":
        return jnp.concatenate([a, b], 0) if a.shape[1] == b.shape[1] else jnp.concatenate(
            [a, a], 1)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return BINARY[name](a, a)
    return BINARY[name](a, b)


@st.composite
def random_programs(draw: st.DrawFn) -> tuple[list[tuple[int, int]], Any, list[tuple[str, int,
                                                                                          int]]]:
    dims = st.integers(1, 6)
    shapes = draw(st.lists(st.tuples(dims, dims), min_size=1, max_size=3))
    dtype = draw(st.sampled_from([jnp.float32, jnp.float32, jnp.bfloat16]))
    steps = draw(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50),
                                    st.integers(0, 50)), min_size=1, max_size=7))
    return shapes, dtype, steps


def _build(steps: list[tuple[str, int, int]], outputs: int) -> Callable[..., tuple[Array, ...]]:
    def program(*xs: Array) -> tuple[Array, ...]:
        pool = list(xs)
        for name, i, j in steps:
            pool.append(_apply(name, pool[i % len(pool)], pool[j % len(pool)]))
        return tuple(pool[-outputs:])

    return program


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(random_programs(), st.integers(1, 2))
def test_random_programs_keep_the_contract_and_match_xla(
        case: tuple[list[tuple[int, int]], Any, list[tuple[str, int, int]]],
        outputs: int) -> None:
    shapes, dtype, steps = case
    fn = _build(steps, outputs)
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]
    program = tiermap.lower(fn, *args)
    check_invariants(program)
    assert_flops_agree(program, xla_flops(jax.jit(fn).lower(*args)), f"{steps} on {shapes}")
    assert all(op.flops >= 0 and op.bytes_read >= 0 for op in program.walk())
    round_trip(program)
