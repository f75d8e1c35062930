"""FLOP agreement with XLA's cost analysis on real models (tests/zoo.py) and the examples.

Each model is traced and lowered once per module; `Program.flops_one_trip` must be within 2% of
`jax.jit(fn).lower(*args).cost_analysis()["flops"]` (custom calls counted as 0, see helpers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import pytest

from tests import zoo
from tests.frontend.helpers import assert_flops_agree, check_invariants, xla_flops
from tiermap.examples import models
from tiermap.frontend.convert import program_from_module
from tiermap.frontend.mlir import stablehlo_op_count
from tiermap.ir.program import Program

BUILDERS: dict[str, Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]] = {
    **zoo.MODELS,
    "example_transformer_train": models.transformer_train,
    "example_transformer_train_adam": lambda: models.transformer_train(layers=2,
                                                                       optimizer="adam"),
    "example_transformer_forward_jax_attention": lambda: models.transformer_forward(
        layers=2, attention_impl="jax"),
    "example_mlp": models.mlp,
    "example_attention_causal": lambda: models.attention(n=256, causal=True),
}


class Lowered:
    """One model traced once: the jax Lowered stage, its module and tiermap's Program."""

    def __init__(self, name: str) -> None:
        fn, args = BUILDERS[name]()
        self.lowered = jax.jit(fn).lower(*args)
        self.module = self.lowered.compiler_ir("stablehlo")
        self.program: Program = program_from_module(self.module, name=name)


@pytest.fixture(scope="module")
def lowered() -> Callable[[str], Lowered]:
    cache: dict[str, Lowered] = {}

    def get(name: str) -> Lowered:
        if name not in cache:
            cache[name] = Lowered(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_flops_agree_with_xla(name: str, lowered: Callable[[str], Lowered]) -> None:
    model = lowered(name)
    assert_flops_agree(model.program, xla_flops(model.lowered), name)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_invariants_hold(name: str, lowered: Callable[[str], Lowered]) -> None:
    check_invariants(lowered(name).program)


def test_example_train_step_is_about_4500_stablehlo_ops(lowered: Callable[[str], Lowered]
                                                         ) -> None:
    model = lowered("example_transformer_train")
    count = stablehlo_op_count(model.module)
    assert 4000 <= count <= 5500, count
    assert 3000 <= model.program.num_steps <= count


def test_resnet_has_convolutions_pooling_and_its_backward(lowered: Callable[[str], Lowered]
                                                          ) -> None:
    kinds = {op.kind for op in lowered("haiku_resnet50_train").program.walk()}
    assert {"stablehlo.convolution", "stablehlo.reduce_window",
            "stablehlo.select_and_scatter"} <= kinds


def test_flax_train_step_has_dropout_rng_loops(lowered: Callable[[str], Lowered]) -> None:
    program = lowered("flax_transformer_train").program
    loops = [op for op in program.ops if op.kind == "stablehlo.while"]
    assert loops and all(op.trip_count == 5 for op in loops)  # threefry's 5 rounds
    assert program.flops == pytest.approx(
        program.flops_one_trip + sum(op.flops - op.flops_one_trip for op in loops))


@pytest.mark.parametrize("name, target", [("eigh_custom_call", "lapack_ssyevd"),
                                          ("pure_callback", "python_cpu_callback")])
def test_custom_calls_are_kept_and_flagged(name: str, target: str,
                                           lowered: Callable[[str], Lowered]) -> None:
    program = lowered(name).program
    calls = [op for op in program.walk() if op.kind == "stablehlo.custom_call"]
    assert len(calls) == 1 and target in calls[0].attrs["target"]
    assert calls[0].flops == 0 and calls[0].bytes_read > 0 and calls[0].bytes_written > 0
    assert any(calls[0].id in a and target in a for a in program.assumptions)


def test_cond_costs_the_most_expensive_branch(lowered: Callable[[str], Lowered]) -> None:
    program = lowered("cond_branches").program
    (case,) = [op for op in program.ops if op.kind == "stablehlo.case"]
    n = 64
    assert case.flops == 2 * n * n * n + n * n  # dot + add; the cheap branch is n·n
    assert case.transcendentals == n * n
    assert {op.kind for op in case.body} >= {"stablehlo.dot_general", "stablehlo.exponential"}
    assert len(case.inputs) > case.attrs["num_operands"]  # the branch captures x
    assert any("case" in a and "most expensive" in a for a in program.assumptions)
