"""Fusion decisions as data: which ops run as one kernel and which tensors never reach memory.

The fusion pass (fusion/fuse.py) produces a `Fusion`; the cost model, the placement strategies and
the verifier read it. Without fusion every op is its own group and every tensor is materialized.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tiermap.ir.plan import TileChoice
from tiermap.ir.program import Program


@dataclass(frozen=True)
class FusionGroup:
    """Ops that run as one kernel.

    `internal` tensors are produced and consumed inside the group and are not materialized.
    `reads_per_input` says how many times the tiled kernel reads each external input (1 unless
    tiling re-reads it, as FlashAttention re-reads K and V once per query block; 0 for a tensor
    another group left unmaterialized and this group recomputes on chip, as an attention
    backward recomputes P). `attrs` holds what the pass that formed the group found (for
    attention: lengths, head dims, causal, dtype and the tensors in the Q/K/V/O roles).
    """

    id: str
    kind: str
    op_ids: tuple[str, ...]
    internal: frozenset[str] = frozenset()
    reads_per_input: Mapping[str, float] = field(default_factory=dict, hash=False)
    working_set_bytes: int = 0
    attrs: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Fusion:
    """All fusion groups of a program (only multi-op groups are listed).

    `notes` says how the groups were chosen (solver, status, what was left unfused and why);
    `warnings` what may make them depend on timing (the solver's wall-clock guard fired).
    """

    groups: tuple[FusionGroup, ...] = ()
    tiles: tuple[TileChoice, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def group_of(self) -> dict[str, FusionGroup]:
        """Map op id → its group, for ops that are fused."""
        return {op_id: g for g in self.groups for op_id in g.op_ids}

    def unmaterialized(self) -> frozenset[str]:
        """Tensors that never reach memory."""
        out: set[str] = set()
        for g in self.groups:
            out |= g.internal
        return frozenset(out)

    @staticmethod
    def none(program: Program) -> Fusion:
        """No fusion: every op alone, every tensor materialized."""
        return Fusion()
