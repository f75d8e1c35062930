"""annotate_mlir: tiermap.* attributes land on the right StableHLO ops and the text parses back."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import pytest
import zoo
from tiermap.compiler import frontend
from tiermap.compiler.annotate import annotate_mlir
from tiermap.compiler.ir import Program

import tiermap
from examples import models


def _annotated_ops(text: str) -> dict[str, tuple[str, dict[str, str]]]:
    """tiermap.id → (op name, {attribute name: printed value}) over the whole parsed module."""
    module = frontend.parse_module(text)
    found: dict[str, tuple[str, dict[str, str]]] = {}
    with module.context:
        stack = [module.operation]
        while stack:
            op = stack.pop()
            for region in op.regions:
                for block in region.blocks:
                    for wrapped in block.operations:
                        inner = wrapped.operation
                        table = inner.attributes
                        attrs = {table[i].name: str(table[i].attr) for i in range(len(table))
                                 if table[i].name.startswith("tiermap.")}
                        if "tiermap.id" in attrs:
                            op_id = attrs["tiermap.id"].strip('"')
                            assert op_id not in found, f"{op_id} annotated twice"
                            found[op_id] = (inner.name, attrs)
                        stack.append(inner)
    return found


def _round_trip(program: Program) -> tuple[str, dict[str, tuple[str, dict[str, str]]]]:
    attrs = {op.id: {"id": op.id} for op in program.walk()}
    text = program.annotate(attrs)
    found = _annotated_ops(text)
    assert set(found) == set(attrs)
    for op in program.walk():
        name, _ = found[op.id]
        assert name == op.attrs.get("folded_from", op.kind), op.id
    return text, found


def test_round_trip_through_shared_callees() -> None:
    fn, args = models.transformer_train(layers=2, d_model=32, seq=16, batch=2, vocab=64)
    program = tiermap.lower(fn, *args)
    text, _ = _round_trip(program)
    # layer_norm & co are called from several sites: each annotated site got its own copy.
    assert "_tiermap_" in text
    again = frontend.lower_mlir(text)
    assert again.flops == program.flops
    assert [op.kind for op in again.ops] == [op.kind for op in program.ops]


def test_round_trip_into_loop_bodies_and_branches() -> None:
    for fn, args in (zoo.scan_rnn(steps=4), zoo.cond_branches(n=8)):
        program = tiermap.lower(fn, *args)
        assert any(op.body for op in program.ops)
        _round_trip(program)


def test_attribute_types() -> None:
    fn, args = models.mlp(batch=2, sizes=(4, 8, 3))
    program = tiermap.lower(fn, *args)
    dot = next(op for op in program.ops if op.kind == "stablehlo.dot_general")
    values: dict[str, Any] = {
        "id": dot.id, "tier": "sram", "step": 7, "ratio": 0.25, "fused": True,
        "tiles": [64, 128], "placement": {"hbm": 3, "sram": 1}, "pinned": None,
    }
    text = program.annotate({dot.id: values})
    name, attrs = _annotated_ops(text)[dot.id]
    assert name == "stablehlo.dot_general"
    assert attrs["tiermap.tier"] == '"sram"'
    assert attrs["tiermap.step"] == "7 : i64"
    assert attrs["tiermap.ratio"].startswith("2.5") and attrs["tiermap.ratio"].endswith("f64")
    assert attrs["tiermap.fused"] == "true"
    assert attrs["tiermap.tiles"] == "[64, 128]"  # the printer elides i64 in arrays
    assert attrs["tiermap.placement"] == "{hbm = 3 : i64, sram = 1 : i64}"
    assert attrs["tiermap.pinned"] == "unit"


def test_annotate_mlir_is_the_program_method() -> None:
    fn, args = models.mlp(batch=2, sizes=(4, 3))
    program = tiermap.lower(fn, *args)
    attrs = {program.ops[0].id: {"tier": "hbm"}}
    assert annotate_mlir(program, attrs) == program.annotate(attrs)


def test_unknown_op_id_is_named() -> None:
    program = tiermap.lower(lambda x: x * 2.0, jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(ValueError, match=r"op id\(s\) op99 not in program"):
        program.annotate({"op99": {"tier": "sram"}})


def test_unsupported_value_type_is_named() -> None:
    program = tiermap.lower(lambda x: x * 2.0, jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(TypeError, match=r"cannot write object"):
        program.annotate({program.ops[-1].id: {"tier": object()}})


def test_program_without_source_is_rejected() -> None:
    program = tiermap.lower(lambda x: x * 2.0, jax.ShapeDtypeStruct((4,), jnp.float32))
    bare = dataclasses.replace(program, source_mlir="")
    with pytest.raises(ValueError, match=r"no source StableHLO"):
        bare.annotate({program.ops[-1].id: {"tier": "sram"}})
