"""Multi-chip targets: the `[devices]` and `[interconnect]` tables of a target file.

A target describes ONE device (its compute and memory tiers); a multi-chip target adds how many
such devices there are and the interconnect between them:

    [devices]
    count = 8

    [interconnect]
    name = "NVLink 4 + NVSwitch"
    topology = "switch"            # "ring", "torus-2d" or "switch"
    shape = [2, 4]                 # torus-2d only: the torus dimensions, product = devices.count
    link_bytes_per_s = 25e9        # one link, one direction
    links_per_device = 18          # links of one device that a collective drives together
    latency_s = 1e-6               # one hop (start-up of one algorithm step)

`collective_time_s` prices a collective op of the partitioned program on this interconnect; the
algorithm factors are written out in its docstring and in docs/architecture.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

TOPOLOGIES: tuple[str, ...] = ("ring", "torus-2d", "switch")
DEVICES_KEYS: tuple[str, ...] = ("count",)
INTERCONNECT_KEYS: tuple[str, ...] = (
    "name", "topology", "shape", "link_bytes_per_s", "links_per_device", "latency_s",
)
COLLECTIVE_KINDS: tuple[str, ...] = (
    "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "collective_permute",
)

HINTS: dict[str, str] = {
    "devices": "a [devices] table with count, e.g. count = 8",
    "count": "the number of devices, e.g. count = 8",
    "interconnect": "an [interconnect] table with topology, link_bytes_per_s, "
                    "links_per_device and latency_s",
    "topology": "one of " + ", ".join(f'"{t}"' for t in TOPOLOGIES),
    "shape": "the torus dimensions, e.g. shape = [2, 4] (their product is devices.count)",
    "link_bytes_per_s": "one link's bandwidth in one direction, bytes/s, e.g. 25e9",
    "links_per_device": "how many links of one device a collective drives at once, e.g. 18",
    "latency_s": "seconds per algorithm step (one hop), e.g. latency_s = 1e-6",
}


@dataclass(frozen=True)
class Interconnect:
    """The links between the devices of a multi-chip target.

    `device_bytes_per_s` = `link_bytes_per_s` x `links_per_device`: what one device can send (and,
    at the same time, receive) when a collective drives all its links.
    """

    num_devices: int
    topology: str
    link_bytes_per_s: float
    links_per_device: int
    latency_s: float
    shape: tuple[int, ...] = ()
    name: str = ""

    @property
    def device_bytes_per_s(self) -> float:
        return self.link_bytes_per_s * self.links_per_device


@dataclass(frozen=True)
class CollectiveCost:
    """The price of one collective on the interconnect (one device's view)."""

    kind: str
    group_size: int
    payload_bytes: int
    wire_bytes: float
    steps: int
    time_s: float


def _torus_dims(group_size: int, shape: tuple[int, ...]) -> list[int]:
    """The sub-torus a group of `group_size` devices spans: whole dimensions first (XLA's device
    order fills the minor dimension first), then a part of the next one."""
    dims: list[int] = []
    left = group_size
    for d in reversed(shape):
        if left <= 1:
            break
        take = math.gcd(left, d) if left % d else d
        dims.append(take)
        left //= take
    if left > 1:
        dims.append(left)
    return dims


def collective_time_s(kind: str, payload_bytes: int, group_size: int,
                      ic: Interconnect) -> CollectiveCost:
    """Seconds one collective takes: wire bytes / bandwidth + steps x latency.

    `payload_bytes` is the collective's whole buffer on one device, as XLA's HLO writes it: the
    operand of an all-reduce, reduce-scatter, all-to-all or collective-permute, the result of an
    all-gather. With n = `group_size` devices and W = `device_bytes_per_s`:

    - all-reduce: bandwidth-optimal (reduce-scatter + all-gather) sends 2(n-1)/n x payload per
      device on a ring, a torus (two concurrent dimension orders use all four links) or a switch.
      Steps: ring 2(n-1); torus 2 x sum(d-1) over the group's dimensions; switch 2.
    - all-gather, reduce-scatter: (n-1)/n x payload; steps: ring n-1, torus sum(d-1), switch 1.
    - all-to-all: each device keeps 1/n and sends (n-1)/n x payload; on a switch at W, on a
      bidirectional ring or torus the average message travels d/4 hops per dimension, so the
      wire bytes are (n-1)/n x payload x max(1, sum(d)/4). Steps: ring/torus sum(d-1), switch 1.
    - collective-permute: each device sends its payload to one peer over one link
      (`link_bytes_per_s`), one step.
    """
    n = max(group_size, 1)
    dims = [n] if ic.topology == "ring" else _torus_dims(n, ic.shape or (n,))
    hops = sum(d - 1 for d in dims)
    bw = ic.device_bytes_per_s
    frac = (n - 1) / n
    if n == 1:
        wire, steps = 0.0, 0
    elif kind == "all_reduce":
        wire = 2.0 * frac * payload_bytes
        steps = 2 if ic.topology == "switch" else 2 * hops
    elif kind in ("all_gather", "reduce_scatter"):
        wire = frac * payload_bytes
        steps = 1 if ic.topology == "switch" else hops
    elif kind == "all_to_all":
        spread = 1.0 if ic.topology == "switch" else max(1.0, sum(dims) / 4.0)
        wire = frac * payload_bytes * spread
        steps = 1 if ic.topology == "switch" else hops
    elif kind == "collective_permute":
        wire, steps, bw = float(payload_bytes), 1, ic.link_bytes_per_s
    else:
        raise ValueError(f"unknown collective kind '{kind}' (known: {', '.join(COLLECTIVE_KINDS)})")
    time_s = (wire / bw if wire else 0.0) + steps * ic.latency_s
    return CollectiveCost(kind, n, int(payload_bytes), wire, steps, time_s)


class Checker(Protocol):
    """What `check_multichip` needs of the loader's checker (tiermap/hardware/loader.py)."""

    problems: list[str]

    def add(self, key_path: str, problem: str, fix: str | None = None) -> None: ...
    def unknown_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...],
                     path: str) -> None: ...
    def string(self, table: Mapping[str, Any], key: str, path: str,
               required: bool = True) -> str | None: ...
    def integer(self, table: Mapping[str, Any], key: str, path: str,
                required: bool = True) -> int | None: ...
    def number(self, table: Mapping[str, Any], key: str, path: str, required: bool = True,
               allow_zero: bool = False, hint: str | None = None) -> float | None: ...
    def table(self, data: Mapping[str, Any], key: str, path: str,
              required: bool = True) -> Mapping[str, Any] | None: ...


def check_multichip(checker: Checker, data: Mapping[str, Any]) -> Interconnect | None:
    """Validate `[devices]` and `[interconnect]` (both or neither); every problem goes to
    `checker`. Returns the Interconnect, or None for a single-device target or on a problem."""
    has_devices, has_ic = "devices" in data, "interconnect" in data
    if not has_devices and not has_ic:
        return None
    before = len(checker.problems)
    if has_devices != has_ic:
        missing = "interconnect" if has_devices else "devices"
        checker.add(missing, "missing: a multi-chip target needs both [devices] and "
                    "[interconnect]", "add " + HINTS[missing])
    devices = checker.table(data, "devices", "", required=False)
    count = None
    if devices is not None:
        checker.unknown_keys(devices, DEVICES_KEYS, "devices")
        count = checker.integer(devices, "count", "devices")
        if count == 1:
            checker.add("devices.count", "is 1; a one-device target has no [devices] table",
                        "remove [devices] and [interconnect], or give count >= 2")
    ic = checker.table(data, "interconnect", "", required=False)
    if ic is None:
        return None
    path = "interconnect"
    checker.unknown_keys(ic, INTERCONNECT_KEYS, path)
    name = checker.string(ic, "name", path, required=False)
    topology = checker.string(ic, "topology", path)
    if topology is not None and topology not in TOPOLOGIES:
        checker.add(f"{path}.topology", f"unknown topology '{topology}'", HINTS["topology"])
        topology = None
    link_bw = checker.number(ic, "link_bytes_per_s", path, hint=HINTS["link_bytes_per_s"])
    links = checker.integer(ic, "links_per_device", path)
    latency_s = checker.number(ic, "latency_s", path, allow_zero=True, hint=HINTS["latency_s"])
    shape = _shape(checker, ic, topology, count)
    if len(checker.problems) > before:
        return None
    assert count is not None and topology is not None and link_bw is not None
    assert links is not None and latency_s is not None
    return Interconnect(num_devices=count, topology=topology, link_bytes_per_s=link_bw,
                        links_per_device=links, latency_s=latency_s, shape=shape,
                        name=name or "")


def _shape(checker: Checker, ic: Mapping[str, Any], topology: str | None,
           count: int | None) -> tuple[int, ...]:
    key = "interconnect.shape"
    if "shape" not in ic:
        if topology == "torus-2d":
            checker.add(key, "missing: a torus-2d interconnect needs its dimensions",
                        HINTS["shape"])
        return (count,) if count else ()
    raw = ic["shape"]
    if (not isinstance(raw, list) or not raw
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in raw)):
        checker.add(key, f"must be a list of positive integers, got {raw!r}", HINTS["shape"])
        return ()
    shape = tuple(raw)
    if topology == "torus-2d" and len(shape) != 2:
        checker.add(key, f"a torus-2d has 2 dimensions, got {len(shape)}", HINTS["shape"])
    elif topology in ("ring", "switch") and len(shape) != 1:
        checker.add(key, f"a {topology} has 1 dimension, got {len(shape)}",
                    f"write shape = [{count or 8}] or leave it out")
    if count is not None and math.prod(shape) != count:
        checker.add(key, f"the dimensions multiply to {math.prod(shape)}, but devices.count "
                    f"is {count}", "make their product equal devices.count")
    return shape


def dumps_multichip(ic: Interconnect | None, toml_str: Any, toml_float: Any) -> list[str]:
    """The `[devices]` and `[interconnect]` tables of `ic` as TOML lines (none if None)."""
    if ic is None:
        return []
    out = ["", "[devices]", f"count = {ic.num_devices}", "", "[interconnect]"]
    if ic.name:
        out.append(f"name = {toml_str(ic.name)}")
    out.append(f"topology = {toml_str(ic.topology)}")
    out.append(f"shape = [{', '.join(str(d) for d in ic.shape)}]")
    out.append(f"link_bytes_per_s = {toml_float(ic.link_bytes_per_s)}")
    out.append(f"links_per_device = {ic.links_per_device}")
    out.append(f"latency_s = {toml_float(ic.latency_s)}")
    return out
