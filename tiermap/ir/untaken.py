"""Plan decisions the applied program does not realise, for planning again without them.

`tiermap.apply` lists each plan decision as applied or not (`tiermap.ir.decisions`). Where one
is not, the plan is made again with it forbidden (tiermap/as_run.py), so that the plan predicts
what runs: an attention left to XLA is not fused and tiled, a tensor whose host moves are not
placed stays in device memory, a tensor the applied program does not recompute is stored.

Each entry names the program it is about (`Program.name`: the planned program, or a loop body's
program) and a tensor id of that program; `ANY` in either place means every one.

- `attention`: (program, O) pairs: the attention whose output is O is not fused as attention
  (its ops fuse as ordinary chains, its scores are materialized);
- `on_device`: (program, tensor) pairs: the tensor stays in tiers no slower than the target's
  main memory (no host tier, no read-only home);
- `recompute`: (program, tensor) pairs: the tensor is not dropped and computed again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ANY = "*"


def _holds(pairs: frozenset[tuple[str, str]], program: str, tensor: str) -> bool:
    return any(p in (program, ANY) and t in (tensor, ANY) for p, t in pairs)


@dataclass(frozen=True)
class Untaken:
    """Decisions the next plan must not make (module docstring)."""

    attention: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    on_device: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    recompute: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return bool(self.attention or self.on_device or self.recompute)

    def fuses_attention(self, program: str, output: str) -> bool:
        """Whether the attention with output `output` of `program` may be fused as attention."""
        return not _holds(self.attention, program, output)

    def device_only(self, program: str, tensor: str) -> bool:
        """Whether `tensor` of `program` must stay in device memory."""
        return _holds(self.on_device, program, tensor)

    def may_recompute(self, program: str, tensor: str) -> bool:
        """Whether `tensor` of `program` may be dropped and computed again."""
        return not _holds(self.recompute, program, tensor)

    def union(self, other: Untaken) -> Untaken:
        return Untaken(self.attention | other.attention, self.on_device | other.on_device,
                       self.recompute | other.recompute)

    def count(self) -> int:
        return len(self.attention) + len(self.on_device) + len(self.recompute)

    def to_dict(self) -> dict[str, Any]:
        return {name: sorted([p, t] for p, t in getattr(self, name))
                for name in ("attention", "on_device", "recompute")}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Untaken:
        def pairs(xs: Iterable[Any]) -> frozenset[tuple[str, str]]:
            return frozenset((str(p), str(t)) for p, t in xs)

        return Untaken(pairs(d.get("attention", [])), pairs(d.get("on_device", [])),
                       pairs(d.get("recompute", [])))
