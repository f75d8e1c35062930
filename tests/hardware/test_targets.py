"""Tests for the built-in targets and the strict schema-v1 loader."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tiermap.errors import HardwareSpecError, TiermapError
from tiermap.hardware import (
    Link,
    Target,
    Tier,
    builtin_target_names,
    dumps_target,
    load_target,
    loads_target,
)

EXPECTED_TIERS = {
    "a100": ["smem", "hbm", "host"],
    "cpu": ["l1", "l2", "l3", "dram"],
    "dgx-h100": ["smem", "hbm", "host"],
    "h100": ["smem", "hbm", "host"],
    "mi300x": ["lds", "hbm", "host"],
    "sn40l": ["sram", "hbm", "ddr"],
    "sn40l-node": ["sram", "hbm", "ddr"],
    "stm32f746": ["sram", "flash"],
    "tpu-v5e": ["vmem", "hbm", "host"],
    "tpu-v5e-8": ["vmem", "hbm", "host"],
}

# A small valid file; each mistake test edits one thing in it.
VALID = """\
name = "toy"
description = "a toy accelerator"
sources = ["made up for tests"]
platform = "cuda"
op_overhead_s = 2e-6

[compute]
peak_flops_per_s = { bf16 = 100e12, f32 = 20e12 }
units = 4

[[tiers]]
name = "sram"
capacity_bytes = 4_194_304
per_unit = true
read_bytes_per_s = 10e12
write_bytes_per_s = 10e12

[[tiers]]
name = "hbm"
capacity_bytes = 16_000_000_000
read_bytes_per_s = 1e12
write_bytes_per_s = 1e12
latency_s = 5e-7

[[tiers]]
name = "host"
capacity_bytes = 64_000_000_000
read_bytes_per_s = 25e9
write_bytes_per_s = 25e9

[[links]]
src = "host"
dst = "hbm"
bytes_per_s = 25e9
"""


def problems_of(text: str) -> list[str]:
    """The problems the loader reports for `text` (it must reject it)."""
    with pytest.raises(HardwareSpecError) as info:
        loads_target(text, source="toy.toml")
    assert info.value.source == "toy.toml"
    return info.value.problems


def only_problem(text: str) -> str:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


# -- built-ins -------------------------------------------------------------------------------------


def test_builtin_names_are_the_expected_targets() -> None:
    assert builtin_target_names() == sorted(EXPECTED_TIERS)


@pytest.mark.parametrize("name", sorted(EXPECTED_TIERS))
def test_every_builtin_loads_strictly(name: str) -> None:
    target = load_target(name)
    assert target.name == name
    assert [t.name for t in target.tiers] == EXPECTED_TIERS[name]
    assert target.sources and target.description
    assert target.platform in {"cpu", "cuda", "rocm", "tpu"}
    reads = [t.read_bytes_per_s for t in target.tiers]
    assert reads == sorted(reads, reverse=True), "tiers must be fastest first"
    assert all(p > 0 for p in target.peak_flops_per_s.values())
    for link in target.links:
        assert target.tier(link.src) and target.tier(link.dst)


@pytest.mark.parametrize(
    ("name", "main"),
    [("a100", "hbm"), ("h100", "hbm"), ("mi300x", "hbm"), ("tpu-v5e", "hbm"), ("sn40l", "hbm"),
     ("cpu", "dram"), ("stm32f746", "sram")],
)
def test_main_memory_tier(name: str, main: str) -> None:
    assert load_target(name).main_tier.name == main


def test_builtin_figures_spot_checks() -> None:
    a100 = load_target("a100")
    assert a100.tier("smem").capacity_bytes == 17_712_128 and a100.tier("smem").per_unit
    assert a100.units == 108 and a100.peak("bf16") == 312e12
    assert a100.link_bytes_per_s("hbm", "host") == 25e9
    sn40l = load_target("sn40l")
    assert sn40l.units == 1040 and sn40l.tier("sram").capacity_bytes == 520 * 2**20
    assert sn40l.tier("ddr").capacity_bytes == 3 * 2**39  # 1.5 TiB
    flash = load_target("stm32f746").tier("flash")
    assert flash.read_only and flash.capacity_bytes == 2**20
    assert load_target("tpu-v5e").tier("vmem").capacity_bytes == 128 * 2**20


@pytest.mark.parametrize("name", sorted(EXPECTED_TIERS))
def test_builtin_round_trips_through_dumps(name: str) -> None:
    target = load_target(name)
    assert loads_target(dumps_target(target)) == target


def test_path_objects_and_str_paths_both_load(tmp_path: Path) -> None:
    path = tmp_path / "toy.toml"
    path.write_text(VALID)
    by_path = load_target(path)
    by_str = load_target(str(path))
    assert by_path == by_str
    assert by_path.path == str(path)
    assert by_path.tier("hbm").latency_s == 5e-7 and by_path.op_overhead_s == 2e-6


def test_user_file_equals_the_same_builtin(tmp_path: Path) -> None:
    # The a100 written by hand, in a different style: keys reordered, explicit defaults, no
    # comments, plain integers. Loading it by path gives a Target equal to the built-in.
    path = tmp_path / "my_a100.toml"
    path.write_text(
        """\
platform = "cuda"
name = "a100"
description = \
"NVIDIA A100 SXM4 80GB: 108 SMs, shared memory per SM, 80 GB HBM2e, host DRAM over PCIe 4.0 x16"
[compute]
units = 108
[compute.peak_flops_per_s]
f64 = 19.5e12
f32 = 19.5e12
tf32 = 1.56e14
bf16 = 312000000000000
f16 = 3.12e14
i8 = 624e12
[[tiers]]
write_bytes_per_s = 19.5e12
read_bytes_per_s = 19.5e12
name = "smem"
per_unit = true
capacity_bytes = 17712128
[[tiers]]
name = "hbm"
capacity_bytes = 80_000_000_000
per_unit = false
read_bytes_per_s = 2.039e12
write_bytes_per_s = 2.039e12
[[tiers]]
name = "host"
capacity_bytes = 512e9
read_bytes_per_s = 25e9
write_bytes_per_s = 25e9
[[links]]
src = "host"
dst = "hbm"
bytes_per_s = 25e9
"""
    )
    # 512e9 is a float: strictly, a capacity must be an integer.
    with pytest.raises(HardwareSpecError, match=r"tiers\[2\]\.capacity_bytes: must be an integer"):
        load_target(path)
    fixed = path.read_text().replace("capacity_bytes = 512e9", "capacity_bytes = 512_000_000_000")
    path.write_text(fixed)
    builtin = load_target("a100")
    mine = load_target(path)
    assert mine == dataclass_replace_sources(builtin, mine.sources)
    assert mine.path == str(path) and builtin.path != mine.path


def dataclass_replace_sources(target: Target, sources: tuple[str, ...]) -> Target:
    from dataclasses import replace

    return replace(target, sources=sources)


def test_copy_of_builtin_file_equals_builtin(tmp_path: Path) -> None:
    builtin = load_target("sn40l")
    assert builtin.path is not None
    copy = tmp_path / "sn40l.toml"
    copy.write_text(Path(builtin.path).read_text())
    assert load_target(copy) == builtin


def test_unknown_builtin_name_lists_known_names() -> None:
    with pytest.raises(HardwareSpecError) as info:
        load_target("a10")
    message = str(info.value)
    for name in EXPECTED_TIERS:
        assert name in message
    assert "did you mean 'a100'" in message.lower()
    assert isinstance(info.value, TiermapError)


def test_missing_file_is_reported() -> None:
    with pytest.raises(HardwareSpecError, match="no such file"):
        load_target("/nonexistent/dir/target.toml")


def test_target_instance_passes_through() -> None:
    target = load_target("h100")
    assert load_target(target) is target


def test_valid_file_builds_the_dataclasses() -> None:
    target = loads_target(VALID)
    assert target.tiers[0] == Tier("sram", 4_194_304, 10e12, 10e12, per_unit=True)
    assert target.links == (Link("host", "hbm", 25e9),)
    assert target.peak("f8E4M3FN") == 20e12  # falls back to f32


# -- one test per kind of mistake ------------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    problem = only_problem(VALID.replace('platform = "cuda"', 'platform = "cuda"\nplatfrom = 1'))
    assert problem.startswith("platfrom: unknown key")
    assert "did you mean 'platform'" in problem


def test_unknown_nested_keys_at_every_level() -> None:
    text = VALID.replace("units = 4", "units = 4\nclock_hz = 1e9")
    text = text.replace("latency_s = 5e-7", "latency_s = 5e-7\ncapcity = 3")
    text = text.replace('dst = "hbm"\n', 'dst = "hbm"\nduplex = true\n')
    problems = problems_of(text)
    assert any(p.startswith("compute.clock_hz: unknown key") for p in problems)
    assert any(p.startswith("tiers[1].capcity: unknown key") for p in problems)
    assert any(p.startswith("links[0].duplex: unknown key") for p in problems)
    assert len(problems) == 3


def test_duplicate_key_reports_line() -> None:
    text = VALID.replace("latency_s = 5e-7", "latency_s = 5e-7\nread_bytes_per_s = 2e12")
    problem = only_problem(text)
    line = text.splitlines().index("read_bytes_per_s = 2e12") + 1
    assert problem.startswith(f"tiers[1].read_bytes_per_s (line {line}): duplicate key")


def test_duplicate_table_reports_line() -> None:
    text = VALID + "\n[compute]\nunits = 8\n"
    problem = only_problem(text)
    line = len(VALID.splitlines()) + 2
    assert problem.startswith(f"compute (line {line}): table declared twice")


def test_missing_required_fields() -> None:
    text = VALID.replace('name = "toy"\n', "").replace("write_bytes_per_s = 1e12\n", "")
    problems = problems_of(text)
    assert problems[0].startswith("name: missing required key; add")
    assert any(p.startswith("tiers[1].write_bytes_per_s: missing required key") for p in problems)
    assert len(problems) == 2


def test_missing_sections() -> None:
    problems = problems_of('name = "x"\nplatform = "cpu"\n')
    assert any(p.startswith("compute: missing required key") for p in problems)
    assert any(p.startswith("tiers: missing required key") for p in problems)


def test_wrong_types() -> None:
    text = VALID.replace("units = 4", 'units = "4"')
    text = text.replace("capacity_bytes = 4_194_304", "capacity_bytes = 4.5e6")
    text = text.replace("per_unit = true", 'per_unit = "yes"')
    text = text.replace('sources = ["made up for tests"]', 'sources = "made up"')
    problems = problems_of(text)
    assert any(p.startswith('compute.units: must be an integer, got string "4"') for p in problems)
    assert any(
        p.startswith("tiers[0].capacity_bytes: must be an integer, got float") for p in problems
    )
    assert any(p.startswith('tiers[0].per_unit: must be true or false, got string "yes"')
               for p in problems)
    assert any(p.startswith("sources: must be an array of strings") for p in problems)
    assert len(problems) == 4


def test_integral_float_capacity_suggests_the_integer() -> None:
    text = VALID.replace("capacity_bytes = 16_000_000_000", "capacity_bytes = 16e9")
    problem = only_problem(text)
    assert "write it as an integer: capacity_bytes = 16_000_000_000" in problem


def test_non_positive_capacity() -> None:
    problem = only_problem(VALID.replace("capacity_bytes = 16_000_000_000", "capacity_bytes = -5"))
    assert problem.startswith("tiers[1].capacity_bytes: must be > 0, got -5; ")
    assert "whole-chip capacity in bytes" in problem


def test_non_positive_bandwidths_peaks_and_units() -> None:
    text = VALID.replace("write_bytes_per_s = 10e12", "write_bytes_per_s = 0")
    text = text.replace("bf16 = 100e12", "bf16 = -1.0")
    text = text.replace("units = 4", "units = 0")
    text = text.replace('dst = "hbm"\nbytes_per_s = 25e9', 'dst = "hbm"\nbytes_per_s = 0.0')
    problems = problems_of(text)
    assert "tiers[0].write_bytes_per_s: must be > 0, got 0" in [p.split(";")[0] for p in problems]
    assert any(
        p.startswith("compute.peak_flops_per_s.bf16: must be > 0, got -1.0") for p in problems
    )
    assert any(p.startswith("compute.units: must be > 0, got 0") for p in problems)
    assert any(p.startswith("links[0].bytes_per_s: must be > 0, got 0.0") for p in problems)
    assert len(problems) == 4


def test_non_finite_numbers() -> None:
    problem = only_problem(VALID.replace("read_bytes_per_s = 1e12", "read_bytes_per_s = nan"))
    assert problem.startswith("tiers[1].read_bytes_per_s: must be a finite number, got nan")


def test_negative_optional_numbers() -> None:
    text = VALID.replace("latency_s = 5e-7", "latency_s = -1e-9").replace(
        "op_overhead_s = 2e-6", "op_overhead_s = -2e-6"
    )
    problems = problems_of(text)
    assert any(p.startswith("tiers[1].latency_s: must be >= 0") for p in problems)
    assert any(p.startswith("op_overhead_s: must be >= 0") for p in problems)


def test_tiers_not_fastest_first() -> None:
    problem = only_problem(VALID.replace("read_bytes_per_s = 25e9", "read_bytes_per_s = 2e12"))
    assert problem.startswith("tiers[2].read_bytes_per_s: tiers must be listed fastest first")
    assert "'host'" in problem and "'hbm'" in problem and "reorder" in problem


def test_duplicate_tier_names() -> None:
    problems = problems_of(VALID.replace('name = "host"', 'name = "hbm"'))
    assert any(p.startswith("tiers[2].name: duplicate tier name 'hbm' (also tiers[1])")
               for p in problems)


def test_link_to_unknown_tier() -> None:
    problem = only_problem(VALID.replace('src = "host"', 'src = "hots"'))
    assert problem.startswith("links[0].src: names unknown tier 'hots'")
    assert "did you mean 'host'" in problem


def test_link_to_itself_and_duplicate_link() -> None:
    text = VALID + '\n[[links]]\nsrc = "hbm"\ndst = "host"\nbytes_per_s = 1e9\n'
    text += '\n[[links]]\nsrc = "hbm"\ndst = "hbm"\nbytes_per_s = 1e9\n'
    problems = problems_of(text)
    assert any(p.startswith("links[1]: a link between 'hbm' and 'host' is already declared")
               for p in problems)
    assert any(p.startswith("links[2]: links tier 'hbm' to itself") for p in problems)


def test_read_only_tier_first() -> None:
    text = VALID.replace("per_unit = true", "per_unit = true\nread_only = true")
    problem = only_problem(text)
    assert problem.startswith("tiers[0].read_only: the first (fastest) tier must be writable")


def test_read_only_only_tier() -> None:
    text = """\
name = "rom"
platform = "cpu"
[compute]
peak_flops_per_s = { f32 = 1e9 }
units = 1
[[tiers]]
name = "flash"
capacity_bytes = 1_048_576
read_bytes_per_s = 1e9
write_bytes_per_s = 1e5
read_only = true
"""
    problem = only_problem(text)
    assert "first (fastest) tier must be writable" in problem
    assert "at least one writable tier" in problem


def test_no_main_memory_tier() -> None:
    text = VALID.replace("latency_s = 5e-7", "latency_s = 5e-7\nper_unit = true").replace(
        "write_bytes_per_s = 25e9", "write_bytes_per_s = 25e9\nper_unit = true"
    )
    assert only_problem(text).startswith("tiers: no main-memory tier")


def test_unknown_platform() -> None:
    problem = only_problem(VALID.replace('platform = "cuda"', 'platform = "gpu"'))
    assert problem.startswith("platform: unknown platform 'gpu'")
    assert '"cuda"' in problem or "cuda" in problem


def test_unknown_dtype() -> None:
    problem = only_problem(VALID.replace("f32 = 20e12", "fp32 = 20e12"))
    assert problem.startswith("compute.peak_flops_per_s.fp32: unknown dtype")
    assert "did you mean 'f32'" in problem


def test_empty_tiers_and_peaks() -> None:
    text = """\
name = "x"
platform = "cpu"
tiers = []
[compute]
peak_flops_per_s = {}
units = 1
"""
    problems = problems_of(text)
    assert any(p.startswith("tiers: must list at least one tier") for p in problems)
    assert any(p.startswith("compute.peak_flops_per_s: must list at least one dtype")
               for p in problems)


def test_invalid_toml_syntax() -> None:
    problem = only_problem(VALID.replace("units = 4", "units = "))
    line = VALID.splitlines().index("units = 4") + 1
    assert problem.startswith(f"line {line}: not valid TOML")


def test_several_mistakes_reported_together(tmp_path: Path) -> None:
    text = VALID.replace("units = 4", "units = -2")  # non-positive
    text = text.replace("capacity_bytes = 16_000_000_000", "capacity_bytes = -5")  # non-positive
    text = text.replace('src = "host"', 'src = "disk"')  # unknown tier
    text = text.replace("read_bytes_per_s = 25e9", "read_bytes_per_s = 5e12")  # out of order
    text = text.replace('platform = "cuda"', 'platform = "cuda"\ncolour = "red"')  # unknown key
    text = text.replace("latency_s = 5e-7", "latency_s = 5e-7\nlatency_s = 6e-7")  # duplicate
    text = text.replace('name = "toy"\n', "")  # missing
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(HardwareSpecError) as info:
        load_target(path)
    error = info.value
    assert error.source == str(path)
    heads = [p.split(":")[0] for p in error.problems]
    assert sorted(heads) == sorted(
        [
            f"tiers[1].latency_s (line {text.splitlines().index('latency_s = 6e-7') + 1})",
            "colour",
            "name",
            "compute.units",
            "tiers[1].capacity_bytes",
            "tiers[2].read_bytes_per_s",
            "links[0].src",
        ]
    ), error.problems
    message = str(error)
    assert message.startswith(f"{path}: 7 problem(s):")
    assert "tiers[1].capacity_bytes: must be > 0, got -5" in message


def test_error_lists_problems_in_file_order_and_is_parseable_toml_free() -> None:
    # The error message itself is plain text, one problem per line.
    with pytest.raises(HardwareSpecError) as info:
        loads_target(VALID.replace("units = 4", "units = 0").replace("f32", "f31"))
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + len(info.value.problems)
    assert all(line.startswith("  - ") for line in lines[1:])


def test_dumps_writes_optional_fields() -> None:
    target = loads_target(VALID)
    text = dumps_target(target)
    data = tomllib.loads(text)
    assert data["tiers"][1]["latency_s"] == 5e-7
    assert data["op_overhead_s"] == 2e-6
    assert loads_target(text) == target
