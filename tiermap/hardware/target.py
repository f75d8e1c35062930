"""The hardware target: compute peaks, memory tiers (fastest first) and links between tiers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tiermap.hardware.interconnect import Interconnect


@dataclass(frozen=True)
class Tier:
    """One memory tier. `capacity_bytes` is whole-chip; a `per_unit` tier is split across units."""

    name: str
    capacity_bytes: int
    read_bytes_per_s: float
    write_bytes_per_s: float
    per_unit: bool = False
    latency_s: float = 0.0
    energy_pj_per_byte: float | None = None
    read_only: bool = False
    persistent: bool | None = None
    # Measured bandwidth of a stream that reads and writes this tier at once (a copy), bytes of
    # both directions per second; None: not measured (the cost model adds read and write times).
    copy_bytes_per_s: float | None = None
    # Outputs of at least `first_touch_min_bytes` land in fresh pages from the OS (glibc maps
    # large blocks anew each time): they are written at `first_touch_bytes_per_s` (page faults
    # included). None: not measured.
    first_touch_bytes_per_s: float | None = None
    first_touch_min_bytes: int | None = None

    @property
    def holds_tensors(self) -> bool:
        """Whether tensors may stay here between ops: `persistent`, by default not `per_unit`."""
        return (not self.per_unit) if self.persistent is None else self.persistent


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
    # How ops use the compute beyond the peaks (optional [compute] keys; defaults fit
    # accelerators). A calibrated CPU sets them from measurements (costmodel/calibration.py).
    vector_peak_fraction: float = 1.0
    transcendental_flops: float = 1.0
    parallel_grain_elements: float = 0.0
    # A multi-chip target: how many of this device there are and the links between them
    # ([devices] and [interconnect], tiermap/hardware/interconnect.py); None for one device.
    interconnect: Interconnect | None = None
    # The working-set model of a calibrated CPU (costmodel/working_set.py; optional [compute]
    # keys, all written by `tiermap calibrate`). `working_set_tiers`: charge each kernel's bytes
    # at the fastest tier whose capacity holds its working set (caches included).
    working_set_tiers: bool = False
    # dtype -> ((n, FLOP/s of an n x n x n matmul), ...), n ascending.
    matmul_flops_per_s: Mapping[str, tuple[tuple[int, float], ...]] = field(
        default_factory=dict)
    # transcendental op kind (short: "exponential", "tanh", "erf", "log") -> elements per second.
    transcendental_per_s: Mapping[str, float] = field(default_factory=dict)
    # FLOP/s of a reduce's body (a sum retires one add per element); 0: not measured.
    reduce_flops_per_s: float = 0.0
    # Units one convolution keeps busy (XLA's CPU backend runs it on one thread; measured by
    # the CPU time over the wall time of a convolution); 0: not measured (as many as any op).
    convolution_units: int = 0
    path: str | None = field(default=None, compare=False)

    @property
    def num_devices(self) -> int:
        """How many devices the target has (1 without an [interconnect])."""
        return self.interconnect.num_devices if self.interconnect else 1

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.tiers)
        raise KeyError(f"target '{self.name}' has no tier '{name}' (tiers: {known})")

    def tier_index(self, name: str) -> int:
        return [t.name for t in self.tiers].index(name)

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`.

        Falls back to the dtype's family ("f8E4M3FN" -> "f8", "f4E2M1FN" -> "f4", "ui8" -> "i8"),
        then to the f32 figure, then to the slowest listed.
        """
        if dtype in self.peak_flops_per_s:
            return self.peak_flops_per_s[dtype]
        family = dtype[:2] if dtype.startswith(("f8", "f4")) else dtype.removeprefix("u")
        if family in self.peak_flops_per_s:
            return self.peak_flops_per_s[family]
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
    def residency_tiers(self) -> tuple[Tier, ...]:
        """Tiers a placement may put tensors in (fastest first)."""
        return tuple(t for t in self.tiers if t.holds_tensors)

    @property
    def scratch_tier(self) -> Tier | None:
        """The per-core on-chip tier that bounds a fused group's working set (its tile budget)."""
        for t in self.tiers:
            if t.per_unit:
                return t
        return None

    @property
    def main_tier(self) -> Tier:
        """The main-memory tier: the fastest tier that is neither per-unit nor read-only."""
        for t in self.tiers:
            if not t.per_unit and not t.read_only:
                return t
        return self.tiers[-1]
