"""Recomputation as data: a stored tensor dropped after its forward use and computed again.

The recompute pass (tiermap/recompute/) chooses them and rewrites the program: the ops that
computed the tensor are repeated, as new ops (`Op.attrs[RECOMPUTE_OF_ATTR]` names the op each
repeats), just before the first read after the tensor's longest idle span; that read and every
later one read the copy. So no tier holds the tensor over the span `freed_steps`, and the copy's
ops are priced, fused, placed and verified like any other op. `Plan.recomputes` lists them
(plan JSON key "recomputes", schema v2, added 2026-12-07; plans written before have none).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# On a repeated op: the id of the op it repeats (in the rewritten program's numbering).
RECOMPUTE_OF_ATTR = "recompute_of"


@dataclass(frozen=True)
class Recompute:
    """One recomputed tensor.

    Attributes:
        tensor: the tensor dropped after its last read before `step` (its producer's output).
        copy: the tensor the repeated ops write; the reads from `step` on read it.
        step: the step of the first repeated op; they run at `step .. step + len(op_ids) - 1`.
        op_ids: the repeated ops, in order; `of_ops` the ops they repeat, in the same order.
        inputs: the tensors the repeated ops read that they do not write (resident at their
            steps; the verifier checks it).
        nbytes: the tensor's bytes.
        freed_steps: (first, last) steps at which no tier holds `tensor` or `copy`, where it
            would otherwise be held.
        time_s: the recomputation's cost as the selection estimated it (its ops alone, fused,
            on the main-memory tier); the plan prices the ops themselves.
        reason: why it was chosen.
    """

    tensor: str
    copy: str
    step: int
    op_ids: tuple[str, ...]
    of_ops: tuple[str, ...]
    inputs: tuple[str, ...]
    nbytes: int
    freed_steps: tuple[int, int]
    time_s: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "copy": self.copy, "step": self.step,
                "op_ids": list(self.op_ids), "of_ops": list(self.of_ops),
                "inputs": list(self.inputs), "nbytes": self.nbytes,
                "freed_steps": list(self.freed_steps), "time_s": self.time_s,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recompute:
        return cls(tensor=d["tensor"], copy=d["copy"], step=int(d["step"]),
                   op_ids=tuple(d["op_ids"]), of_ops=tuple(d["of_ops"]),
                   inputs=tuple(d["inputs"]), nbytes=int(d["nbytes"]),
                   freed_steps=(int(d["freed_steps"][0]), int(d["freed_steps"][1])),
                   time_s=float(d["time_s"]), reason=str(d.get("reason", "")))
