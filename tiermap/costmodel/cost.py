"""`Cost`: a frozen, addable estimate of what running something takes (work, traffic, time)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


def _frozen(d: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(d))


def _merge(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    out = dict(a)
    for key, val in b.items():
        out[key] = out.get(key, 0.0) + val
    return out


@dataclass(frozen=True)
class Cost:
    """Work, memory traffic and time of an op, a kernel or a whole program.

    Attributes:
        flops_by_dtype: floating-point operations by compute dtype ("f32", "bf16" ...);
            transcendentals are included at the cost model's flop equivalent.
        bytes_by_tier: bytes read plus bytes written, by memory tier name.
        time_s: predicted wall time; costs add sequentially (times sum).
    """

    flops_by_dtype: Mapping[str, float] = field(default_factory=dict, hash=False)
    bytes_by_tier: Mapping[str, float] = field(default_factory=dict, hash=False)
    time_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "flops_by_dtype", _frozen(self.flops_by_dtype))
        object.__setattr__(self, "bytes_by_tier", _frozen(self.bytes_by_tier))

    @staticmethod
    def zero() -> Cost:
        """The cost of doing nothing."""
        return Cost({}, {}, 0.0)

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(_merge(self.flops_by_dtype, other.flops_by_dtype),
                    _merge(self.bytes_by_tier, other.bytes_by_tier),
                    self.time_s + other.time_s)

    def __radd__(self, other: object) -> Cost:
        # Lets `sum(costs)` start from 0.
        if other == 0:
            return self
        return NotImplemented

    @property
    def flops(self) -> float:
        """All flops, every dtype together."""
        return float(sum(self.flops_by_dtype.values()))

    @property
    def bytes(self) -> float:
        """All bytes moved, every tier together."""
        return float(sum(self.bytes_by_tier.values()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cost):
            return NotImplemented
        return (dict(self.flops_by_dtype) == dict(other.flops_by_dtype)
                and dict(self.bytes_by_tier) == dict(other.bytes_by_tier)
                and self.time_s == other.time_s)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.flops_by_dtype.items())),
                     tuple(sorted(self.bytes_by_tier.items())), self.time_s))
