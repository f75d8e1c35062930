"""Every bad input raises a typed error whose message names the culprit and the fix."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import tiermap
from tiermap.errors import TiermapError, UnsupportedProgramError, UserCodeError
from tiermap.frontend.lowering import lower_mlir
from tiermap.frontend.mlir import parse_module

X = jax.ShapeDtypeStruct((4,), jnp.float32)


def _module(body: str, arg_type: str = "tensor<4xf32>") -> str:
    return (f"func.func @main(%a: {arg_type}) -> {arg_type} {{\n{body}\n"
            f"  return %r : {arg_type}\n}}\n")


def test_dynamic_shape_names_the_argument_and_the_fix() -> None:
    text = _module("  %r = stablehlo.abs %a : tensor<?x4xf32>", "tensor<?x4xf32>")
    with pytest.raises(UnsupportedProgramError, match=r"argument 0 of @main.*dynamic shape "
                                                      r"tensor<\?x4xf32>.*Fix"):
        tiermap.lower_mlir(text)


def test_unranked_tensor_is_rejected() -> None:
    text = "func.func @main(%a: tensor<*xf32>) -> tensor<*xf32> {\n  return %a : tensor<*xf32>\n}"
    with pytest.raises(UnsupportedProgramError, match=r"argument 0 .*not a ranked tensor"):
        tiermap.lower_mlir(text)


def test_registered_foreign_dialect_names_the_op() -> None:
    text = _module("  %r = arith.addf %a, %a : tensor<4xf32>")
    with pytest.raises(UnsupportedProgramError,
                       match=r"line 2.*op 'arith.addf' of dialect 'arith' is not StableHLO"):
        tiermap.lower_mlir(text)


def test_unknown_dialect_names_the_op_and_the_dialect() -> None:
    text = _module("  %r = tosa.add %a, %a : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>")
    with pytest.raises(UnsupportedProgramError,
                       match=r"line 2: op 'tosa.add' of dialect 'tosa' is not StableHLO"):
        tiermap.lower_mlir(text)


def test_unknown_dialect_in_generic_form_quotes_the_line() -> None:
    text = _module('  %r = "tosa.add"(%a, %a) : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>')
    with pytest.raises(UnsupportedProgramError, match=r"line 2: op 'tosa.add' of an unknown"):
        tiermap.lower_mlir(text)


def test_unparseable_text_gives_the_line() -> None:
    with pytest.raises(UnsupportedProgramError,
                       match=r"could not parse .*line 1: .*'this'.*Fix"):
        tiermap.lower_mlir("this is not mlir { at all")


def test_invalid_op_quotes_the_source_line() -> None:
    text = _module("  %b = stablehlo.reshape %a : (tensor<4xf32>) -> tensor<5xf32>\n"
                   "  %r = stablehlo.abs %a : tensor<4xf32>")
    with pytest.raises(UnsupportedProgramError, match=r"line 2: .*in `%b = stablehlo.reshape"):
        tiermap.lower_mlir(text)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.mlir"
    with pytest.raises(UnsupportedProgramError, match=r"model.mlir: no such file"):
        lower_mlir(missing)
    with pytest.raises(UnsupportedProgramError, match=r"no such file"):
        tiermap.lower_mlir(str(missing))


def test_module_without_public_function() -> None:
    text = ("func.func private @helper(%a: tensor<4xf32>) -> tensor<4xf32> {\n"
            "  return %a : tensor<4xf32>\n}")
    with pytest.raises(UnsupportedProgramError, match=r"no public func.func"):
        tiermap.lower_mlir(text)


def test_call_to_undefined_function_names_the_callee() -> None:
    # The MLIR verifier catches undefined symbols at parse time.
    text = _module("  %r = func.call @nowhere(%a) : (tensor<4xf32>) -> tensor<4xf32>")
    with pytest.raises(UnsupportedProgramError, match=r"nowhere"):
        tiermap.lower_mlir(text)


def test_recursive_calls_are_rejected() -> None:
    text = ("func.func @main(%a: tensor<4xf32>) -> tensor<4xf32> {\n"
            "  %r = func.call @loop(%a) : (tensor<4xf32>) -> tensor<4xf32>\n"
            "  return %r : tensor<4xf32>\n}\n"
            "func.func private @loop(%a: tensor<4xf32>) -> tensor<4xf32> {\n"
            "  %r = func.call @loop(%a) : (tensor<4xf32>) -> tensor<4xf32>\n"
            "  return %r : tensor<4xf32>\n}\n")
    with pytest.raises(UnsupportedProgramError, match=r"recursive call chain main -> loop"):
        tiermap.lower_mlir(text)


def test_data_dependent_python_control_flow_names_the_function_and_the_fix() -> None:
    def relu_if(x: jax.Array) -> jax.Array:
        if jnp.sum(x) > 0:  # needs a concrete value while tracing
            return x
        return -x

    with pytest.raises(UnsupportedProgramError,
                       match=r"relu_if: cannot be traced to a static program.*Fix.*lax.cond"):
        tiermap.lower(relu_if, X)


def test_value_dependent_shape_names_the_function() -> None:
    def positives(x: jax.Array) -> jax.Array:
        return x[x > 0]

    with pytest.raises(UnsupportedProgramError, match=r"positives: cannot be traced"):
        tiermap.lower(positives, X)


def test_user_exception_is_wrapped_with_the_function_name() -> None:
    def broken(x: jax.Array) -> jax.Array:
        raise ValueError("weights file is corrupt")

    with pytest.raises(UserCodeError, match=r"broken raised ValueError: weights file is corrupt"
                       ) as info:
        tiermap.lower(broken, X)
    assert isinstance(info.value.original, ValueError)
    assert isinstance(info.value, TiermapError)


def test_user_shape_error_is_wrapped() -> None:
    def mismatched(x: jax.Array) -> jax.Array:
        return x @ jnp.ones((5, 3))

    with pytest.raises(UserCodeError, match=r"mismatched raised TypeError"):
        tiermap.lower(mismatched, X)


def test_parse_module_error_type() -> None:
    with pytest.raises(UnsupportedProgramError):
        parse_module("module {")
