"""The example `make run` compiles: one training step of a 12-layer GPT-style decoder.

    tiermap compile tiermap/examples/transformer_train.py:build --target sn40l

d_model 256, 4 heads, 256 tokens, batch 8, vocab 1024, float32, SGD: about 4.8k StableHLO ops
(3.8k once the frontend has folded constants and dropped dead code), 1.4e11 FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tiermap.examples.models import transformer_train


def build() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """(fn, args) of the 12-layer training step; args are ShapeDtypeStruct pytrees."""
    return transformer_train(layers=12)


def build_scan() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The same training step with the 12 blocks stacked and run by `lax.scan`."""
    return transformer_train(layers=12, scan=True)
