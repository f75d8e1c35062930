"""The frontend's entry points: lower, lower_mlir (text or file), platforms, locations."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import tiermap
from tests.frontend.helpers import check_invariants
from tiermap.examples import models
from tiermap.frontend.lowering import lower_mlir

S = jax.ShapeDtypeStruct


def test_lower_mlir_text_and_file_match_lower(tmp_path: Path) -> None:
    fn, args = models.mlp(batch=4, sizes=(8, 16, 4))
    program = tiermap.lower(fn, *args)
    text = jax.jit(fn).lower(*args).as_text()
    from_text = lower_mlir(text)
    path = tmp_path / "tiny_mlp.mlir"
    path.write_text(text, encoding="utf-8")
    from_file = lower_mlir(path)
    from_str_path = tiermap.lower_mlir(str(path))
    for other in (from_text, from_file, from_str_path):
        assert [op.kind for op in other.ops] == [op.kind for op in program.ops]
        assert other.flops == program.flops
        check_invariants(other)
    assert from_file.name == "tiny_mlp" and program.name == "mlp_forward"


def test_program_keeps_its_source_module() -> None:
    program = tiermap.lower(lambda x: jnp.tanh(x) * 2.0, S((4,), jnp.float32))
    assert program.to_mlir().startswith("module @jit_")
    assert "stablehlo.tanh" in program.to_mlir()


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_lowers_for_accelerator_platforms_without_one(platform: str) -> None:
    def mixed(a: jax.Array, b: jax.Array) -> jax.Array:  # the CPU backend rejects this one
        return jnp.dot(a, b, preferred_element_type=jnp.float32)

    program = tiermap.lower(mixed, S((16, 32), jnp.float16), S((32, 8), jnp.float16),
                            platform=platform)
    assert program.platform == platform and program.flops == 2 * 16 * 8 * 32
    (dot,) = [op for op in program.ops if op.kind == "stablehlo.dot_general"]
    assert dot.dtype == "f16"


def test_static_arguments() -> None:
    def power(x: jax.Array, n: int) -> jax.Array:
        for _ in range(n):
            x = x * x
        return x

    program = tiermap.lower(power, S((8,), jnp.float32), 3, static_argnums=(1,))
    assert program.flops == 3 * 8


def test_locations_name_the_op_and_the_users_line() -> None:
    fn, args = models.mlp(batch=2, sizes=(4, 3))
    program = tiermap.lower(fn, *args)
    (dot,) = [op for op in program.ops if op.kind == "stablehlo.dot_general"]
    assert dot.location.startswith("jit(mlp_forward)/dot_general @ models.py:")


def test_nested_op_lookup_by_id() -> None:
    program = tiermap.lower(
        lambda x: jax.lax.fori_loop(0, 3, lambda i, y: jnp.sin(y), x), S((4,), jnp.float32))
    body_op = next(op for op in program.walk() if op.kind == "stablehlo.sine")
    assert "." in body_op.id and program.op(body_op.id) is body_op
    with pytest.raises(KeyError, match="op9.r1.9"):
        program.op("op9.r1.9")


def test_ir_text_lists_every_op() -> None:
    program = tiermap.lower(lambda x, y: jnp.maximum(x @ y, 0.0).sum(),
                            S((4, 8), jnp.float32), S((8, 2), jnp.float32))
    text = str(program)
    assert text.splitlines()[0] == "program @<lambda>(%t0: f32[4,8], %t1: f32[8,2]) {"
    assert "stablehlo.dot_general" in text and "flops=128" in text
    assert text.splitlines()[-2].startswith("  return %t")


def test_partitioned_module_is_flagged() -> None:
    text = ('module @sharded attributes {mhlo.num_partitions = 2 : i32} {\n'
            '  func.func public @main(%a: tensor<8xf32>) -> tensor<8xf32> {\n'
            '    %r = stablehlo.abs %a : tensor<8xf32>\n'
            '    return %r : tensor<8xf32>\n  }\n}\n')
    program = tiermap.lower_mlir(text)
    assert program.name == "sharded"
    assert any("partitioned over 2 devices" in a for a in program.assumptions)
