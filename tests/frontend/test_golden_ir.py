"""Golden text: the printed IR of three small programs and one annotated module.

Regenerate after an intended change with `TIERMAP_REGEN_GOLDEN=1 pytest tests/frontend`, then
review the diff of tests/frontend/golden/ like code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import pytest

import tiermap
from tests import zoo
from tiermap.examples import models
from tiermap.frontend.annotate import annotate_mlir
from tiermap.ir.program import Program

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("TIERMAP_REGEN_GOLDEN") == "1"


def _softmax_layernorm() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    def softmax_layernorm(x: jax.Array, scale: jax.Array) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * scale
        return jax.nn.softmax(y, axis=-1)

    return softmax_layernorm, (jax.ShapeDtypeStruct((2, 8), jnp.float32),
                               jax.ShapeDtypeStruct((8,), jnp.float32))


PROGRAMS: dict[str, Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]] = {
    "mlp": lambda: models.mlp(batch=2, sizes=(4, 8, 3)),
    "softmax_layernorm": _softmax_layernorm,
    "scan_rnn": lambda: zoo.scan_rnn(steps=3, batch=2, width=4),
}


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGENERATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        pytest.skip(f"regenerated {path.name}")
    assert path.is_file(), f"{path} missing; run with TIERMAP_REGEN_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"{path.name} changed (see module doc)"


def _lower(name: str) -> Program:
    fn, args = PROGRAMS[name]()
    return tiermap.lower(fn, *args)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_printed_ir(name: str) -> None:
    _check(f"{name}.ir.txt", str(_lower(name)) + "\n")


def test_annotated_mlir() -> None:
    program = _lower("mlp")
    attrs = {op.id: {"tier": "sram" if op.flops else "hbm", "step": op.step}
             for op in program.ops if op.kind != "stablehlo.constant"}
    _check("mlp.annotated.mlir", annotate_mlir(program, attrs))
