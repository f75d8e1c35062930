"""The hardware target: compute peaks, memory tiers (fastest first) and links between tiers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tier:
    """One memory tier. `capacity_bytes` is for the whole chip; `per_unit` tiers are split by units."""

    name: str
    capacity_bytes: int
    read_bytes_per_s: float
    write_bytes_per_s: float
    per_unit: bool = False
    latency_s: float = 0.0
    energy_pj_per_byte: float | None = None
    read_only: bool = False


@dataclass(frozen=True)
class Link:
    """A transfer path between two tiers (either direction)."""

    src: str
    dst: str
    bytes_per_s: float


@dataclass(frozen=True)
class Target:
    """A declared hardware target, as loaded from a schema-v1 TOML file."""

    name: str
    description: str
    platform: str
    peak_flops_per_s: Mapping[str, float]
    units: int
    tiers: tuple[Tier, ...]
    links: tuple[Link, ...] = ()
    sources: tuple[str, ...] = ()
    op_overhead_s: float = 0.0
    path: str | None = field(default=None, compare=False)

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.tiers)
        raise KeyError(f"target '{self.name}' has no tier '{name}' (tiers: {known})")

    def tier_index(self, name: str) -> int:
        return [t.name for t in self.tiers].index(name)

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`; falls back to the f32 figure, then to the slowest listed."""
        if dtype in self.peak_flops_per_s:
            return self.peak_flops_per_s[dtype]
        if "f32" in self.peak_flops_per_s:
            return self.peak_flops_per_s["f32"]
        return min(self.peak_flops_per_s.values())

    def link_bytes_per_s(self, src: str, dst: str) -> float:
        """Bandwidth of a transfer src → dst: a declared link, else the slower tier's bandwidth."""
        for link in self.links:
            if {link.src, link.dst} == {src, dst}:
                return link.bytes_per_s
        a, b = self.tier(src), self.tier(dst)
        return min(a.read_bytes_per_s, b.write_bytes_per_s)

    @property
    def main_tier(self) -> Tier:
        """The main-memory tier: the fastest tier that is neither per-unit nor read-only."""
        for t in self.tiers:
            if not t.per_unit and not t.read_only:
                return t
        return self.tiers[-1]
