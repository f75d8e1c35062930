"""annotate_mlir: tiermap.* attributes land on the right StableHLO ops and the text parses back."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import pytest

import tiermap
from tests import zoo
from tests.frontend.helpers import annotated_ops, round_trip
from tiermap.examples import models
from tiermap.frontend.annotate import annotate_mlir
from tiermap.frontend.lowering import lower_mlir
from tiermap.ir.plan import annotations_for


def test_round_trip_through_shared_callees() -> None:
    fn, args = models.transformer_train(layers=2, d_model=32, seq=16, batch=2, vocab=64)
    program = tiermap.lower(fn, *args)
    text, _ = round_trip(program)
    # layer_norm & co are called from several sites: each annotated site got its own copy.
    assert "_tiermap_" in text
    again = lower_mlir(text)
    assert again.flops == program.flops
    assert [op.kind for op in again.ops] == [op.kind for op in program.ops]


def test_round_trip_into_loop_bodies_and_branches() -> None:
    for fn, args in (zoo.scan_rnn(steps=4), zoo.cond_branches(n=8)):
        program = tiermap.lower(fn, *args)
        assert any(op.body for op in program.ops)
        round_trip(program)


def test_attribute_types() -> None:
    fn, args = models.mlp(batch=2, sizes=(4, 8, 3))
    program = tiermap.lower(fn, *args)
    dot = next(op for op in program.ops if op.kind == "stablehlo.dot_general")
    values: dict[str, Any] = {
        "id": dot.id, "tier": "sram", "step": 7, "ratio": 0.25, "fused": True,
        "tiles": [64, 128], "placement": {"hbm": 3, "sram": 1}, "pinned": None,
    }
    text = annotate_mlir(program, {dot.id: values})
    name, attrs = annotated_ops(text)[dot.id]
    assert name == "stablehlo.dot_general"
    assert attrs["tiermap.tier"] == '"sram"'
    assert attrs["tiermap.step"] == "7 : i64"
    assert attrs["tiermap.ratio"].startswith("2.5") and attrs["tiermap.ratio"].endswith("f64")
    assert attrs["tiermap.fused"] == "true"
    assert attrs["tiermap.tiles"] == "[64, 128]"  # the printer elides i64 in arrays
    assert attrs["tiermap.placement"] == "{hbm = 3 : i64, sram = 1 : i64}"
    assert attrs["tiermap.pinned"] == "unit"


def test_a_plans_annotated_mlir_is_annotate_mlir_of_its_annotations() -> None:
    fn, args = models.mlp(batch=2, sizes=(4, 3))
    plan = tiermap.plan(fn, *args, target="h100", strategy="greedy")
    assert plan.program is not None
    assert plan.annotated_mlir() == annotate_mlir(plan.program, annotations_for(plan))


def test_unknown_op_id_is_named() -> None:
    program = tiermap.lower(lambda x: x * 2.0, jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(ValueError, match=r"op id\(s\) op99 not in program"):
        annotate_mlir(program, {"op99": {"tier": "sram"}})


def test_unsupported_value_type_is_named() -> None:
    program = tiermap.lower(lambda x: x * 2.0, jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(TypeError, match=r"cannot write object"):
        annotate_mlir(program, {program.ops[-1].id: {"tier": object()}})


def test_program_without_source_is_rejected() -> None:
    program = tiermap.lower(lambda x: x * 2.0, jax.ShapeDtypeStruct((4,), jnp.float32))
    bare = dataclasses.replace(program, source_mlir="")
    with pytest.raises(ValueError, match=r"no source StableHLO"):
        annotate_mlir(bare, {program.ops[-1].id: {"tier": "sram"}})
