"""Multi-chip targets: the [devices]/[interconnect] schema, the built-ins and collective prices."""

from __future__ import annotations

import re

import pytest

from tests.hardware.test_targets import VALID
from tiermap.errors import HardwareSpecError
from tiermap.hardware import dumps_target, load_target, loads_target
from tiermap.hardware.interconnect import Interconnect, collective_time_s

MULTI = VALID + """
[devices]
count = 8

[interconnect]
name = "toy links"
topology = "torus-2d"
shape = [2, 4]
link_bytes_per_s = 50e9
links_per_device = 4
latency_s = 1e-6
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(HardwareSpecError) as info:
        loads_target(text, source="toy.toml")
    return info.value.problems


def test_multichip_file_loads_and_round_trips() -> None:
    target = loads_target(MULTI)
    ic = target.interconnect
    assert ic is not None and target.num_devices == 8
    assert (ic.topology, ic.shape, ic.links_per_device) == ("torus-2d", (2, 4), 4)
    assert ic.device_bytes_per_s == 200e9
    assert loads_target(dumps_target(target)) == target
    assert loads_target(VALID).num_devices == 1 and loads_target(VALID).interconnect is None


@pytest.mark.parametrize(
    ("name", "topology", "device_bytes_per_s", "shape"),
    [("dgx-h100", "switch", 450e9, (8,)), ("tpu-v5e-8", "torus-2d", 180e9, (2, 4)),
     ("sn40l-node", "switch", 200e9, (8,))],
)
def test_builtin_multichip_targets(name: str, topology: str, device_bytes_per_s: float,
                                   shape: tuple[int, ...]) -> None:
    target = load_target(name)
    ic = target.interconnect
    assert ic is not None and target.num_devices == 8
    assert ic.topology == topology and ic.shape == shape
    assert ic.device_bytes_per_s == pytest.approx(device_bytes_per_s)
    # every device is the single-chip target of the same family
    single = load_target({"dgx-h100": "h100", "tpu-v5e-8": "tpu-v5e",
                          "sn40l-node": "sn40l"}[name])
    assert target.peak_flops_per_s == single.peak_flops_per_s
    assert target.tier("hbm") == single.tier("hbm")
    # each interconnect figure cites a source entry that exists
    text = open(target.path or "", encoding="utf-8").read()
    ic_text = text.split("[interconnect]", 1)[1]
    cited = {int(c) for c in re.findall(r"# .*?\[(\d+)\]", ic_text)}
    assert cited and max(cited) <= len(target.sources)


def test_every_multichip_problem_is_reported_together() -> None:
    bad = (VALID + "\n[devices]\ncount = 6\ncolour = 1\n\n[interconnect]\ntopology = \"mesh\"\n"
           "shape = [2, 4]\nlink_bytes_per_s = -1\nlinks_per_device = 2.5\n")
    problems = problems_of(bad)
    keys = [p.split(":", 1)[0] for p in problems]
    assert "devices.colour" in keys
    assert "interconnect.topology" in keys
    assert "interconnect.link_bytes_per_s" in keys
    assert "interconnect.links_per_device" in keys
    assert "interconnect.latency_s" in keys  # missing
    assert "interconnect.shape" in keys  # 2 x 4 != 6
    assert any("did you mean" in p or "unknown key" in p for p in problems)


def test_devices_without_interconnect_and_torus_without_shape() -> None:
    (problem,) = problems_of(VALID + "\n[devices]\ncount = 8\n")
    assert problem.startswith("interconnect: missing")
    torus = MULTI.replace("shape = [2, 4]\n", "")
    (problem,) = problems_of(torus)
    assert problem.startswith("interconnect.shape: missing")
    ring3 = MULTI.replace('"torus-2d"', '"ring"')
    (problem,) = problems_of(ring3)
    assert "a ring has 1 dimension" in problem


def _ic(topology: str, shape: tuple[int, ...] = (8,)) -> Interconnect:
    return Interconnect(num_devices=8, topology=topology, link_bytes_per_s=25e9,
                        links_per_device=4, latency_s=1e-6, shape=shape)


def test_collective_prices_by_hand() -> None:
    payload = 8_000_000  # bytes on one device
    w = 100e9  # 4 x 25e9
    ring = collective_time_s("all_reduce", payload, 8, _ic("ring"))
    assert ring.wire_bytes == pytest.approx(2 * 7 / 8 * payload)
    assert ring.steps == 14
    assert ring.time_s == pytest.approx(2 * 7 / 8 * payload / w + 14e-6)
    switch = collective_time_s("all_reduce", payload, 8, _ic("switch"))
    assert switch.steps == 2 and switch.time_s == pytest.approx(2 * 7 / 8 * payload / w + 2e-6)
    torus = collective_time_s("all_reduce", payload, 8, _ic("torus-2d", (2, 4)))
    assert torus.steps == 2 * (3 + 1)
    ag = collective_time_s("all_gather", payload, 4, _ic("torus-2d", (2, 4)))
    assert ag.wire_bytes == pytest.approx(3 / 4 * payload) and ag.steps == 3
    a2a_ring = collective_time_s("all_to_all", payload, 8, _ic("ring"))
    assert a2a_ring.wire_bytes == pytest.approx(7 / 8 * payload * 2.0)  # 8/4 hops on average
    permute = collective_time_s("collective_permute", payload, 8, _ic("switch"))
    assert permute.time_s == pytest.approx(payload / 25e9 + 1e-6)  # one link
    assert collective_time_s("all_reduce", payload, 1, _ic("ring")).time_s == 0.0
