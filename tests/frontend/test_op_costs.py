"""Hand-computed FLOPs and bytes of single ops, and the folds XLA's conversion applies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import tiermap
from tests.frontend.helpers import assert_flops_agree, xla_flops
from tiermap.ir.program import Op, Program

f32 = jnp.float32
S = jax.ShapeDtypeStruct


def _only(program: Program, kind: str) -> Op:
    (op,) = [op for op in program.walk() if op.kind == f"stablehlo.{kind}"]
    return op


def _lower(fn, *args) -> Program:  # type: ignore[no-untyped-def]
    program = tiermap.lower(fn, *args)
    assert_flops_agree(program, xla_flops(jax.jit(fn).lower(*args)), fn.__name__)
    return program


def test_dot_general() -> None:
    def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
        return a @ b

    op = _only(_lower(matmul, S((4, 8), f32), S((8, 3), f32)), "dot_general")
    assert op.flops == 2 * 4 * 3 * 8
    assert (op.bytes_read, op.bytes_written) == ((32 + 24) * 4, 12 * 4)
    assert (op.attrs["m"], op.attrs["n"], op.attrs["k"], op.attrs["batch"]) == (4, 3, 8, 1)


def test_batched_dot_attrs() -> None:
    def bmm(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum("bmk,bkn->bmn", a, b)

    op = _only(_lower(bmm, S((5, 4, 8), f32), S((5, 8, 3), f32)), "dot_general")
    assert op.flops == 2 * 5 * 4 * 3 * 8
    assert (op.attrs["batch"], op.attrs["m"], op.attrs["n"], op.attrs["k"]) == (5, 4, 3, 8)


def test_convolution_counts_valid_taps_only() -> None:
    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    op = _only(_lower(conv, S((1, 8, 8, 4), f32), S((3, 3, 4, 6), f32)), "convolution")
    taps_per_dim = 8 * 3 - 2  # the two border rows/columns miss one tap each
    assert op.flops == 2 * 4 * 6 * taps_per_dim ** 2
    assert (op.attrs["cin"], op.attrs["cout"], op.attrs["taps"]) == (4, 6, 9)


@pytest.mark.parametrize("kind", ["transpose", "grouped", "dilated"])
def test_convolution_variants_agree_with_xla(kind: str) -> None:
    dn = ("NHWC", "HWIO", "NHWC")
    x = S((2, 8, 8, 4), f32)

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        if kind == "transpose":
            return jax.lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=dn)
        if kind == "grouped":
            return jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", feature_group_count=2,
                                                dimension_numbers=dn)
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                            dimension_numbers=dn)

    w = S((3, 3, 2 if kind == "grouped" else 4, 6), f32)
    _lower(conv, x, w)


def test_reduce_counts_in_minus_out() -> None:
    def total(x: jax.Array) -> jax.Array:
        return jnp.sum(x, axis=1)

    op = _only(_lower(total, S((4, 8), f32)), "reduce")
    assert op.flops == 4 * 8 - 4
    assert (op.bytes_read, op.bytes_written) == (4 * 8 * 4 + 4, 4 * 4)
    assert op.attrs["body"] == "add"


def test_argmax_reducer_body_is_costed() -> None:
    def best(x: jax.Array) -> jax.Array:
        return jnp.argmax(x, axis=-1)

    op = _only(_lower(best, S((4, 100), f32)), "reduce")
    assert op.flops > 0 and "compare" in op.attrs["body"]


def test_max_pool_reduce_window() -> None:
    def pool(x: jax.Array) -> jax.Array:
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                     "VALID")

    op = _only(_lower(pool, S((1, 9, 9, 2), f32)), "reduce_window")
    assert op.flops == (1 * 4 * 4 * 2) * (9 - 1)
    assert op.attrs["window"] == 9


def test_max_pool_backward_select_and_scatter() -> None:
    def pool_sum(x: jax.Array) -> jax.Array:
        return jnp.sum(jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                                             (1, 2, 2, 1), "VALID"))

    grad = jax.grad(pool_sum)
    grad.__name__ = "pool_grad"  # type: ignore[attr-defined]
    op = _only(_lower(grad, S((1, 9, 9, 2), f32)), "select_and_scatter")
    source = 1 * 4 * 4 * 2
    assert op.flops == source * (9 - 1) * 1 + source * 1  # compare per tap, add per source


def test_sort_is_n_log_n() -> None:
    def sort(x: jax.Array) -> jax.Array:
        return jnp.sort(x, axis=-1)

    op = _only(_lower(sort, S((4, 100), f32)), "sort")
    assert op.flops == 400 * 9  # ⌈log2 400⌉ = 9


def test_scatter_add() -> None:
    def scatter(x: jax.Array, i: jax.Array, u: jax.Array) -> jax.Array:
        return x.at[i].add(u)

    op = _only(_lower(scatter, S((100, 8), f32), S((10,), jnp.int32), S((10, 8), f32)),
               "scatter")
    assert op.flops == 10 * 8


def test_transcendentals_are_apart_from_flops() -> None:
    def soft(x: jax.Array) -> jax.Array:
        return jnp.tanh(x) + jnp.exp(x)

    program = _lower(soft, S((10,), f32))
    assert program.transcendentals == 20
    assert _only(program, "tanh").flops == 0
    assert program.flops == 10


@pytest.mark.parametrize("dtype, flops_per_elem", [(f32, 37), (jnp.bfloat16, 39)])
def test_chlo_erf_inv_expansion(dtype: jnp.dtype, flops_per_elem: int) -> None:
    def erfinv(x: jax.Array) -> jax.Array:
        return jax.scipy.special.erfinv(x)

    program = _lower(erfinv, S((100,), dtype))
    (op,) = [op for op in program.ops if op.kind == "chlo.erf_inv"]
    assert (op.flops, op.transcendentals) == (100 * flops_per_elem, 200)


def test_gelu_exact_erf_and_layernorm_agree() -> None:
    def block(x: jax.Array) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
        return jax.nn.gelu(y, approximate=False)

    _lower(block, S((4, 64), f32))


def test_cross_entropy_with_integer_labels_agrees() -> None:
    def xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, labels[:, None], axis=-1).mean()

    program = _lower(xent, S((8, 50), f32), S((8,), jnp.int32))
    assert any(op.kind == "stablehlo.gather" for op in program.ops)


def test_movement_bytes() -> None:
    def move(x: jax.Array) -> jax.Array:
        return jnp.broadcast_to(x[1:3].reshape(2, 1, 4), (2, 5, 4))

    program = _lower(move, S((6, 4), f32))
    sl = _only(program, "slice")
    assert (sl.bytes_read, sl.bytes_written) == (2 * 4 * 4, 2 * 4 * 4)  # reads what it returns
    rs = _only(program, "reshape")
    assert (rs.bytes_read, rs.bytes_written, rs.flops) == (0, 0, 0)  # a reshape is free
    bc = _only(program, "broadcast_in_dim")
    assert (bc.bytes_read, bc.bytes_written) == (2 * 4 * 4, 2 * 5 * 4 * 4)


def test_identities_fold_away_like_xla() -> None:
    def ident(x: jax.Array) -> jax.Array:
        return (x * 1.0 + 0.0) / 1.0  # x·1 and x+0 fold; x/1 does not (XLA keeps it)

    program = _lower(ident, S((16,), f32))
    assert [op.kind for op in program.ops if op.flops] == ["stablehlo.divide"]
    assert any("dropped" in a for a in program.assumptions)


def test_constant_subexpressions_fold_to_constants() -> None:
    def scaled(x: jax.Array) -> jax.Array:
        return x * jnp.sin(jnp.full((16,), 2.0))

    program = _lower(scaled, S((16,), f32))
    assert program.transcendentals == 0  # sin(2) is folded
    folded = [op for op in program.ops if op.attrs.get("folded_from")]
    assert folded and all(not op.inputs for op in folded)


def test_dead_code_is_dropped() -> None:
    def dead(x: jax.Array) -> jax.Array:
        _ = jnp.exp(x) @ x.T  # unused
        return x + 1.0

    program = _lower(dead, S((8, 8), f32))
    assert program.transcendentals == 0 and program.flops == 64
    # The broadcast of 1.0 folds into a constant too.
    assert {op.kind for op in program.ops} == {"stablehlo.constant", "stablehlo.add"}


def test_dropout_rng_and_key_splitting_agree() -> None:
    def dropout(key: jax.Array, x: jax.Array) -> jax.Array:
        k1, k2 = jax.random.split(jax.random.wrap_key_data(key))
        keep = jax.random.bernoulli(k1, 0.9, x.shape)
        noise = jax.random.normal(k2, x.shape)
        return jnp.where(keep, x / 0.9, 0.0) + noise

    _lower(dropout, S((2,), jnp.uint32), S((4, 32), f32))


def test_rng_bit_generator_is_transcendental() -> None:
    def bits(key: jax.Array) -> jax.Array:
        return jax.random.bits(jax.random.wrap_key_data(key, impl="rbg"), (16, 16))

    program = _lower(bits, S((4,), jnp.uint32))
    op = _only(program, "rng_bit_generator")
    assert op.transcendentals >= 256
