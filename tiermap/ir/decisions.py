"""What `tiermap.apply` made of a plan's decisions: each one applied or not, with the reason.

A `Decision` is plain data so that the report and the CLI (which do not import jax) can list it.
Kinds:

- "attention": an attention group the plan fuses and tiles (applied: replaced by a tiled kernel
  with the plan's or searched blocks; not applied: left to XLA, with the matcher's reason);
- "host-input": a program input the plan keeps in a host tier at step 0 (placed in pinned_host
  memory before the call, moved to device memory inside the program);
- "offload": a move of a tensor into a host tier (an eviction, or an output written there) and
  its way back, as `jax.device_put` placements in the applied program;
- "recompute": a tensor the plan drops and computes again (`Plan.recomputes`): its equations run
  again before the read, behind an optimization barrier;
- "loop": decisions inside a loop body's plan that apply does not realise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("attention", "host-input", "offload", "recompute", "loop")


@dataclass(frozen=True)
class Decision:
    """One plan decision and what the applied program does about it.

    Attributes:
        kind: one of `KINDS`.
        subject: what it is about: a tensor id (`t128`), a group (`attn0`), an input position.
        applied: whether the applied program realises it.
        detail: how it was realised (steps, placements), or why not.
        priced: whether the plan's prediction counts it. False for a decision an earlier plan
            made that the applied program did not realise, and that the plan was made again
            without (tiermap/as_run.py): the plan prices the program without it.
    """

    kind: str
    subject: str
    applied: bool
    detail: str
    priced: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "applied": self.applied,
                "detail": self.detail, "priced": self.priced}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Decision:
        return Decision(str(d["kind"]), str(d["subject"]), bool(d["applied"]), str(d["detail"]),
                        bool(d.get("priced", True)))


def decision_counts(decisions: Sequence[Decision]) -> dict[str, tuple[int, int]]:
    """Per kind (in `KINDS` order, kinds present only): (applied, not applied), of the
    decisions the plan's prediction counts."""
    out: dict[str, tuple[int, int]] = {}
    for kind in KINDS:
        mine = [d for d in decisions if d.kind == kind and d.priced]
        if mine:
            done = sum(d.applied for d in mine)
            out[kind] = (done, len(mine) - done)
    return out
