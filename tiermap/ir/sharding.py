"""A sharded plan's communication: per-device facts and every collective on the interconnect.

A partitioned program is one device's program (every device runs it, SPMD); its plan places
that device's tensors in that device's tiers. `ShardingPlan` adds what the devices do together:
each collective's link traffic and time, and how much of it overlaps compute. The times come from
`tiermap/costmodel/communication.py`:

- a compute stream runs the non-collective ops in schedule order, each for its planned time;
- a communication stream runs the collectives in schedule order: one starts when its operands
  are ready and the previous collective is done, and takes its interconnect time
  (`tiermap/hardware/interconnect.py`, at least its planned memory time);
- an op waits for its operands, a collective's results included.

`step_time_s` is when both streams are done; `exposed_comm_s = step_time_s - compute_s` is the
communication compute could not hide; `overlap_fraction = 1 - exposed_comm_s / comm_s`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CollectivePlan:
    """One collective of the per-device program, priced on the interconnect."""

    op_id: str
    kind: str
    group_size: int
    num_groups: int
    payload_bytes: int
    wire_bytes: float
    time_s: float
    start_s: float
    end_s: float
    hidden_s: float


@dataclass(frozen=True)
class ShardingPlan:
    """The communication of a sharded plan (module docstring)."""

    num_devices: int
    interconnect: str
    topology: str
    input_shardings: tuple[str, ...]
    output_shardings: tuple[str, ...]
    argument_bytes: int
    output_bytes: int
    collectives: tuple[CollectivePlan, ...]
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    step_time_s: float

    @property
    def overlap_fraction(self) -> float:
        """Share of the communication time hidden under compute (1.0 with none to hide)."""
        return 1.0 - self.exposed_comm_s / self.comm_s if self.comm_s > 0 else 1.0

    def bytes_by_kind(self) -> dict[str, int]:
        """Payload bytes per collective kind."""
        out: dict[str, int] = {}
        for c in self.collectives:
            out[c.kind] = out.get(c.kind, 0) + c.payload_bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_devices": self.num_devices, "interconnect": self.interconnect,
            "topology": self.topology, "input_shardings": list(self.input_shardings),
            "output_shardings": list(self.output_shardings),
            "argument_bytes": self.argument_bytes, "output_bytes": self.output_bytes,
            "collectives": [dict(c.__dict__) for c in self.collectives],
            "compute_s": self.compute_s, "comm_s": self.comm_s,
            "exposed_comm_s": self.exposed_comm_s, "step_time_s": self.step_time_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardingPlan:
        return cls(
            num_devices=int(d["num_devices"]), interconnect=str(d["interconnect"]),
            topology=str(d["topology"]), input_shardings=tuple(d["input_shardings"]),
            output_shardings=tuple(d["output_shardings"]),
            argument_bytes=int(d["argument_bytes"]), output_bytes=int(d["output_bytes"]),
            collectives=tuple(CollectivePlan(
                op_id=c["op_id"], kind=c["kind"], group_size=int(c["group_size"]),
                num_groups=int(c["num_groups"]), payload_bytes=int(c["payload_bytes"]),
                wire_bytes=float(c["wire_bytes"]), time_s=float(c["time_s"]),
                start_s=float(c["start_s"]), end_s=float(c["end_s"]),
                hidden_s=float(c["hidden_s"])) for c in d["collectives"]),
            compute_s=float(d["compute_s"]), comm_s=float(d["comm_s"]),
            exposed_comm_s=float(d["exposed_comm_s"]), step_time_s=float(d["step_time_s"]),
        )
