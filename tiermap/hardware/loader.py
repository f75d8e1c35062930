"""Strict loader for target files (TOML, schema v1) and the built-in targets.

Every problem in a file is collected, each with its key path and the fix, and raised once as a
`HardwareSpecError`. See docs/architecture.md, "Target files", for the schema.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

from tiermap.errors import HardwareSpecError
from tiermap.hardware.calibrated_keys import (
    CALIBRATED_COMPUTE_KEYS,
    dump_calibrated_compute,
    read_calibrated_compute,
)
from tiermap.hardware.interconnect import HINTS as MULTICHIP_HINTS
from tiermap.hardware.interconnect import check_multichip, dumps_multichip
from tiermap.hardware.target import Link, Target, Tier

BUILTIN_DIR = Path(__file__).resolve().parent

PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "rocm", "tpu")

# dtype keys accepted in `compute.peak_flops_per_s`: the IR's short names, plus the family names
# "f8" and "f4" that stand for every 8-bit / 4-bit float format.
PEAK_DTYPES: frozenset[str] = frozenset(
    (
        "f64 f32 tf32 bf16 f16 f8 f4 "
        "f8E4M3FN f8E5M2 f8E4M3FNUZ f8E5M2FNUZ f8E4M3B11FNUZ f8E4M3 f8E3M4 f8E8M0FNU f4E2M1FN "
        "i1 i2 i4 i8 i16 i32 i64 ui1 ui2 ui4 ui8 ui16 ui32 ui64 c64 c128"
    ).split()
)

TOP_KEYS = (
    "name",
    "description",
    "sources",
    "platform",
    "compute",
    "tiers",
    "links",
    "op_overhead_s",
    "devices",
    "interconnect",
)
COMPUTE_KEYS = (
    "peak_flops_per_s", "units", "vector_peak_fraction", "transcendental_flops",
    "parallel_grain_elements", *CALIBRATED_COMPUTE_KEYS,
)
TIER_KEYS = (
    "name",
    "capacity_bytes",
    "per_unit",
    "read_bytes_per_s",
    "write_bytes_per_s",
    "latency_s",
    "energy_pj_per_byte",
    "read_only",
    "persistent",
    "copy_bytes_per_s",
    "first_touch_bytes_per_s",
    "first_touch_min_bytes",
)
LINK_KEYS = ("src", "dst", "bytes_per_s")

# What to write for each key: used in the fix part of messages.
_HINTS: dict[str, str] = {
    "name": 'a short name, e.g. name = "a100"',
    "description": 'one line, e.g. description = "NVIDIA A100 SXM4 80GB"',
    "sources": 'a list of strings, e.g. sources = ["datasheet title, https://..."]',
    "platform": "one of " + ", ".join(f'"{p}"' for p in PLATFORMS),
    "compute": "a [compute] table with peak_flops_per_s and units",
    "tiers": "one [[tiers]] table per memory tier, fastest first",
    "links": "[[links]] tables with src, dst and bytes_per_s",
    "op_overhead_s": "seconds per op launch, e.g. op_overhead_s = 5e-6",
    "peak_flops_per_s": "a table of FLOP/s by dtype, e.g. peak_flops_per_s = { bf16 = 312e12 }",
    "units": "the number of parallel cores (SMs, PCUs, TensorCores), e.g. units = 108",
    "capacity_bytes": "the whole-chip capacity in bytes, e.g. capacity_bytes = 80_000_000_000",
    "per_unit": "true when the capacity is split evenly across units (per-core SRAM, L1)",
    "read_bytes_per_s": "the whole-chip read bandwidth in bytes/s, e.g. read_bytes_per_s = 2.0e12",
    "write_bytes_per_s": "the whole-chip write bandwidth in bytes/s, e.g. 2.0e12",
    "latency_s": "the access latency in seconds, e.g. latency_s = 5e-7",
    "energy_pj_per_byte": "the access energy in picojoules per byte, e.g. 3.9",
    "read_only": "true for a tier that only holds constants (flash: weights only)",
    "persistent": "true if tensors may stay in this tier between ops (default: not per_unit)",
    "src": "the name of a tier listed under [[tiers]]",
    "dst": "the name of a tier listed under [[tiers]]",
    "bytes_per_s": "the link bandwidth in bytes/s, e.g. bytes_per_s = 25e9",
    **MULTICHIP_HINTS,
}

_DUPLICATE_PREFIX = "__tiermap_duplicate_"
_DECODE_RE = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.S)
_KEY_LINE_RE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_\-.\"' ]+?)(?P<rest>\s*=.*)$", re.S)
_HEADER_RE = re.compile(r"^(?P<indent>\s*)(?P<open>\[\[?)\s*(?P<key>[^\]]+?)\s*(?P<close>\]\]?)")


def builtin_target_names() -> list[str]:
    """Names of the built-in targets (the `*.toml` files shipped in this package), sorted."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_target(name_or_path: str | os.PathLike[str] | Target) -> Target:
    """Load a built-in target by name, or a target file by path.

    Args:
        name_or_path: A built-in name such as "a100", or the path of a schema-v1 `.toml` file
            (a `Target` is returned unchanged).

    Returns:
        The validated `Target`.

    Raises:
        HardwareSpecError: The name is unknown, the file is missing, or the file has problems
            (all of them are listed, each with its key path and the fix).
    """
    if isinstance(name_or_path, Target):  # already loaded: accept it as is
        return name_or_path
    text_arg = os.fspath(name_or_path)
    looks_like_path = (
        not isinstance(name_or_path, str)
        or text_arg.endswith(".toml")
        or os.sep in text_arg
        or (os.altsep is not None and os.altsep in text_arg)
    )
    if not looks_like_path:
        builtin = BUILTIN_DIR / f"{text_arg}.toml"
        if builtin.is_file():
            return _load_file(builtin)
        if Path(text_arg).is_file():
            return _load_file(Path(text_arg))
        raise HardwareSpecError([_unknown_name_message(text_arg)], source="target")
    path = Path(text_arg)
    if not path.is_file():
        raise HardwareSpecError(
            [
                f"no such file: {path}; pass an existing .toml file or a built-in name "
                f"({', '.join(builtin_target_names())})"
            ],
            source=str(path),
        )
    return _load_file(path)


def loads_target(text: str, source: str = "<string>") -> Target:
    """Parse and validate the text of a schema-v1 target file.

    Args:
        text: The TOML text.
        source: Where the text came from, used in error messages.

    Raises:
        HardwareSpecError: The text has problems, all of them listed together.
    """
    return _parse_and_validate(text, source, path=None)


def target_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Target:
    """Validate an already-parsed target table (e.g. from `tomllib.loads`) and build the Target.

    Raises:
        HardwareSpecError: The table has problems, all of them listed together.
    """
    checker = _Checker()
    target = checker.target(data, path=None)
    if checker.problems or target is None:
        raise HardwareSpecError(checker.problems, source=source)
    return target


def _unknown_name_message(name: str) -> str:
    names = builtin_target_names()
    close = difflib.get_close_matches(name.lower(), names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"unknown target '{name}'.{hint} Built-in targets: {', '.join(names)}; "
        "or pass the path of a .toml target file"
    )


def _load_file(path: Path) -> Target:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HardwareSpecError([f"cannot read the file: {exc}"], source=str(path)) from exc
    return _parse_and_validate(text, str(path), path=str(path))


def _parse_and_validate(text: str, source: str, path: str | None) -> Target:
    data, problems = _parse_toml(text)
    checker = _Checker()
    target = checker.target(data, path=path) if data is not None else None
    problems.extend(checker.problems)
    if problems or target is None:
        raise HardwareSpecError(problems, source=source)
    return target


def _parse_toml(text: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Parse TOML; report every duplicate key (tomllib stops at the first) and syntax errors.

    A duplicate key or table is renamed out of the way and parsing is retried, so that one run
    reports all duplicates and the rest of the file is still validated.
    """
    lines = text.splitlines(keepends=True)
    problems: list[str] = []
    for attempt in range(100):
        try:
            data = tomllib.loads("".join(lines))
        except tomllib.TOMLDecodeError as exc:
            found = _DECODE_RE.match(str(exc))
            if found is None:
                problems.append(f"not valid TOML: {exc}")
                return None, problems
            msg, lineno = found["msg"], int(found["line"])
            is_duplicate = msg.startswith(("Cannot overwrite a value", "Cannot declare"))
            if not is_duplicate or not 1 <= lineno <= len(lines):
                if attempt > 0 and problems:  # a renamed duplicate upset the syntax: stop here
                    return None, problems
                if msg.startswith("Duplicate inline table key"):
                    problems.append(f"line {lineno}: {msg.lower()}; keep one of the two entries")
                else:
                    line_text = lines[lineno - 1].strip() if 1 <= lineno <= len(lines) else ""
                    problems.append(
                        f"line {lineno}: not valid TOML ({msg.lower()}): `{line_text}`; "
                        "fix the syntax (https://toml.io/en/v1.0.0)"
                    )
                return None, problems
            renamed = _rename_duplicate(lines, lineno - 1, attempt)
            if renamed is None:
                problems.append(f"line {lineno}: {msg.lower()}; remove the repeated definition")
                return None, problems
            problems.append(renamed)
            continue
        return (_strip_duplicates(data) if problems else data), problems
    return None, problems


def _rename_duplicate(lines: list[str], index: int, attempt: int) -> str | None:
    """Rename the duplicate key or table header on `lines[index]`; return the problem text."""
    line = lines[index]
    context = _table_path_at(lines, index)
    placeholder = f"{_DUPLICATE_PREFIX}{attempt}"
    header = _HEADER_RE.match(line)
    if header is not None and line.lstrip().startswith("["):
        key = header["key"]
        lines[index] = (
            f"{header['indent']}{header['open']}{placeholder}{header['close']}"
            f"{line[header.end() :]}"
        )
        return (
            f"{key} (line {index + 1}): table declared twice (or a key of that name is already "
            "set); merge the two into one table"
        )
    key_line = _KEY_LINE_RE.match(line)
    if key_line is None:
        return None
    key = key_line["key"].strip()
    lines[index] = f"{key_line['indent']}{placeholder}{key_line['rest']}"
    where = f"{context}.{key}" if context else key
    return f"{where} (line {index + 1}): duplicate key, already set above; keep one definition"


def _table_path_at(lines: list[str], index: int) -> str:
    """Key path of the table that line `index` belongs to, e.g. 'tiers[1]' or 'compute'."""
    counts: dict[str, int] = {}
    current = ""
    for line in lines[:index]:
        header = _HEADER_RE.match(line)
        if header is None or not line.lstrip().startswith("["):
            continue
        key = header["key"].strip()
        if header["open"] == "[[":
            counts[key] = counts.get(key, -1) + 1
            current = f"{key}[{counts[key]}]"
        else:
            current = key
    return current


def _strip_duplicates(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_duplicates(v) for k, v in value.items() if not k.startswith(_DUPLICATE_PREFIX)
        }
    if isinstance(value, list):
        return [_strip_duplicates(v) for v in value]
    return value


def _describe(value: Any) -> str:
    """A value as a user wrote it, with its TOML type, for error messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Checker:
    """Collects every problem of a parsed target file; builds the Target when there are none."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, key_path: str, problem: str, fix: str | None = None) -> None:
        self.problems.append(f"{key_path}: {problem}" + (f"; {fix}" if fix else ""))

    # -- generic field readers: each returns the value, or None after recording a problem --------

    def unknown_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            fix = f"did you mean '{close[0]}'?" if close else "remove it"
            self.add(_join(path, key), "unknown key", f"{fix} (allowed: {', '.join(allowed)})")

    def present(self, table: Mapping[str, Any], key: str, path: str, required: bool) -> bool:
        if key in table:
            return True
        if required:
            self.add(_join(path, key), "missing required key", "add " + _HINTS.get(key, key))
        return False

    def string(
        self, table: Mapping[str, Any], key: str, path: str, required: bool = True
    ) -> str | None:
        if not self.present(table, key, path, required):
            return None
        value = table[key]
        if not isinstance(value, str):
            self.add(_join(path, key), f"must be a string, got {_describe(value)}", _HINTS.get(key))
            return None
        if not value.strip():
            self.add(_join(path, key), "must not be empty", _HINTS.get(key))
            return None
        return value

    def boolean(self, table: Mapping[str, Any], key: str, path: str) -> bool | None:
        if not self.present(table, key, path, required=False):
            return None
        value = table[key]
        if not isinstance(value, bool):
            self.add(
                _join(path, key),
                f"must be true or false, got {_describe(value)}",
                f"write {key} = true or {key} = false",
            )
            return None
        return value

    def integer(
        self, table: Mapping[str, Any], key: str, path: str, required: bool = True
    ) -> int | None:
        if not self.present(table, key, path, required):
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(
                _join(path, key), f"must be an integer, got {_describe(value)}", _HINTS.get(key)
            )
            return None
        if isinstance(value, float):
            fix = (
                f"write it as an integer: {key} = {int(value):_}"
                if math.isfinite(value) and value.is_integer()
                else _HINTS.get(key)
            )
            self.add(_join(path, key), f"must be an integer, got {_describe(value)}", fix)
            return None
        if value <= 0:
            self.add(_join(path, key), f"must be > 0, got {value}", _HINTS.get(key))
            return None
        return value

    def number(
        self,
        table: Mapping[str, Any],
        key: str,
        path: str,
        required: bool = True,
        allow_zero: bool = False,
        hint: str | None = None,
    ) -> float | None:
        if not self.present(table, key, path, required):
            return None
        value = table[key]
        fix = hint or _HINTS.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(_join(path, key), f"must be a number, got {_describe(value)}", fix)
            return None
        if not math.isfinite(value):
            self.add(_join(path, key), f"must be a finite number, got {value}", fix)
            return None
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            self.add(_join(path, key), f"must be {bound}, got {value}", fix)
            return None
        return float(value)

    def table(
        self, data: Mapping[str, Any], key: str, path: str, required: bool = True
    ) -> Mapping[str, Any] | None:
        if not self.present(data, key, path, required):
            return None
        value = data[key]
        if not isinstance(value, dict):
            self.add(_join(path, key), f"must be a table, got {_describe(value)}", _HINTS.get(key))
            return None
        return value

    def array_of_tables(
        self, data: Mapping[str, Any], key: str, required: bool
    ) -> list[Mapping[str, Any]] | None:
        if not self.present(data, key, "", required):
            return None
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.add(
                key,
                f"must be an array of tables ([[{key}]] sections), got {_describe(value)}",
                _HINTS.get(key),
            )
            return None
        return value

    # -- the schema -------------------------------------------------------------------------------

    def target(self, data: Mapping[str, Any], path: str | None) -> Target | None:
        """Check the whole file. Returns the Target, or None when a problem was recorded."""
        self.unknown_keys(data, TOP_KEYS, "")
        name = self.string(data, "name", "")
        description = self.string(data, "description", "", required=False)
        sources = self.sources(data)
        platform = self.string(data, "platform", "")
        if platform is not None and platform not in PLATFORMS:
            self.add(
                "platform",
                f"unknown platform '{platform}'",
                f"use one of {', '.join(PLATFORMS)} (the platform JAX lowers for)",
            )
            platform = None
        op_overhead_s = self.number(data, "op_overhead_s", "", required=False, allow_zero=True)
        peaks, units = self.compute(data)
        model = self.compute_model(data)
        tiers = self.tiers(data)
        links = self.links(data)
        interconnect = check_multichip(self, data)
        if self.problems:
            return None
        assert name is not None and platform is not None and peaks is not None
        assert units is not None and tiers is not None and links is not None
        return Target(
            name=name,
            description=description or "",
            platform=platform,
            peak_flops_per_s=peaks,
            units=units,
            tiers=tuple(tiers),
            links=tuple(links),
            sources=tuple(sources or ()),
            op_overhead_s=op_overhead_s or 0.0,
            interconnect=interconnect,
            path=path,
            **model,
        )

    def sources(self, data: Mapping[str, Any]) -> list[str] | None:
        if not self.present(data, "sources", "", required=False):
            return []
        value = data["sources"]
        if not isinstance(value, list):
            self.add(
                "sources", f"must be an array of strings, got {_describe(value)}", _HINTS["sources"]
            )
            return None
        good = True
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.add(
                    f"sources[{i}]", f"must be a string, got {_describe(item)}", _HINTS["sources"]
                )
                good = False
        return list(value) if good else None

    def compute(self, data: Mapping[str, Any]) -> tuple[dict[str, float] | None, int | None]:
        compute = self.table(data, "compute", "")
        if compute is None:
            return None, None
        self.unknown_keys(compute, COMPUTE_KEYS, "compute")
        units = self.integer(compute, "units", "compute")
        table = self.table(compute, "peak_flops_per_s", "compute")
        if table is None:
            return None, units
        if not table:
            self.add(
                "compute.peak_flops_per_s",
                "must list at least one dtype",
                _HINTS["peak_flops_per_s"],
            )
            return None, units
        peaks: dict[str, float] = {}
        allowed = sorted(PEAK_DTYPES)
        for dtype in table:
            key_path = f"compute.peak_flops_per_s.{dtype}"
            if dtype not in PEAK_DTYPES:
                close = difflib.get_close_matches(dtype, allowed, n=1)
                fix = f"did you mean '{close[0]}'?" if close else "use an IR dtype name"
                self.add(key_path, "unknown dtype", f"{fix} (known: {', '.join(allowed)})")
                continue
            value = self.number(
                table,
                dtype,
                "compute.peak_flops_per_s",
                hint=f"FLOP/s for {dtype}, e.g. {dtype} = 312e12",
            )
            if value is not None:
                peaks[dtype] = value
        return peaks, units

    def compute_model(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """The optional [compute] keys that say how ops use the peaks (see Target)."""
        compute = data.get("compute")
        out: dict[str, float] = {}
        if not isinstance(compute, Mapping):
            return out
        fraction = self.number(compute, "vector_peak_fraction", "compute", required=False,
                               hint="fraction of the f32 peak loop code reaches, e.g. 0.05")
        if fraction is not None:
            if fraction > 1.0:
                self.add("compute.vector_peak_fraction", f"must be <= 1, got {fraction}",
                         "a fraction of the f32 peak, e.g. vector_peak_fraction = 0.05")
            out["vector_peak_fraction"] = float(fraction)
        trans = self.number(compute, "transcendental_flops", "compute", required=False,
                            hint="flops one exp/log/tanh costs, e.g. transcendental_flops = 4")
        if trans is not None:
            out["transcendental_flops"] = float(trans)
        grain = self.number(compute, "parallel_grain_elements", "compute", required=False,
                            allow_zero=True,
                            hint="elements per unit before another unit joins, e.g. 50000")
        if grain is not None:
            out["parallel_grain_elements"] = float(grain)
        out.update(read_calibrated_compute(self, compute, PEAK_DTYPES))
        return out

    def tiers(self, data: Mapping[str, Any]) -> list[Tier] | None:
        tables = self.array_of_tables(data, "tiers", required=True)
        if tables is None:
            return None
        if not tables:
            self.add("tiers", "must list at least one tier", _HINTS["tiers"])
            return None
        tiers: list[Tier | None] = [self.tier(t, f"tiers[{i}]") for i, t in enumerate(tables)]
        # Names: unique.
        seen: dict[str, int] = {}
        for i, t in enumerate(tables):
            name = t.get("name")
            if not isinstance(name, str):
                continue
            if name in seen:
                self.add(
                    f"tiers[{i}].name",
                    f"duplicate tier name '{name}' (also tiers[{seen[name]}])",
                    "give every tier a distinct name",
                )
            else:
                seen[name] = i
        # Order: fastest first, by read bandwidth.
        for i in range(1, len(tables)):
            prev, cur = tables[i - 1].get("read_bytes_per_s"), tables[i].get("read_bytes_per_s")
            if _is_number(prev) and _is_number(cur) and cur > prev:
                self.add(
                    f"tiers[{i}].read_bytes_per_s",
                    f"tiers must be listed fastest first, but '{tables[i].get('name')}' "
                    f"({cur:g} B/s) is faster than tiers[{i - 1}] '{tables[i - 1].get('name')}' "
                    f"({prev:g} B/s)",
                    "reorder the [[tiers]] sections by read_bytes_per_s, largest first",
                )
        # Read-only tiers hold constants only: the fastest tier, and main memory, must be writable.
        if tables[0].get("read_only") is True:
            self.add(
                "tiers[0].read_only",
                "the first (fastest) tier must be writable"
                + (", and a target needs at least one writable tier" if len(tables) == 1 else ""),
                "list writable memory (SRAM, HBM) first and put read-only flash after it",
            )
        elif not any(
            t.get("read_only") is not True and t.get("per_unit") is not True for t in tables
        ):
            self.add(
                "tiers",
                "no main-memory tier: every tier is per_unit or read_only",
                "add a writable tier with per_unit = false (HBM, DRAM) for whole tensors",
            )
        if any(t is None for t in tiers):
            return None
        return [t for t in tiers if t is not None]

    def tier(self, table: Mapping[str, Any], path: str) -> Tier | None:
        before = len(self.problems)
        self.unknown_keys(table, TIER_KEYS, path)
        name = self.string(table, "name", path)
        if name is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", name):
            self.add(
                f"{path}.name",
                f"'{name}' is not a valid tier name",
                "use letters, digits, '_' or '-', starting with a letter",
            )
        capacity_bytes = self.integer(table, "capacity_bytes", path)
        read_bytes_per_s = self.number(table, "read_bytes_per_s", path)
        write_bytes_per_s = self.number(table, "write_bytes_per_s", path)
        per_unit = self.boolean(table, "per_unit", path)
        read_only = self.boolean(table, "read_only", path)
        persistent = self.boolean(table, "persistent", path)
        latency_s = self.number(table, "latency_s", path, required=False, allow_zero=True)
        energy = self.number(table, "energy_pj_per_byte", path, required=False, allow_zero=True)
        copy_bytes_per_s = self.number(table, "copy_bytes_per_s", path, required=False,
                                       hint="bytes read plus written per second by a copy")
        first_touch = self.number(table, "first_touch_bytes_per_s", path, required=False,
                                  hint="bytes per second written into fresh pages")
        first_touch_min = self.integer(table, "first_touch_min_bytes", path, required=False)
        if len(self.problems) > before:
            return None
        assert name is not None and capacity_bytes is not None
        assert read_bytes_per_s is not None and write_bytes_per_s is not None
        return Tier(
            name=name,
            capacity_bytes=capacity_bytes,
            read_bytes_per_s=read_bytes_per_s,
            write_bytes_per_s=write_bytes_per_s,
            per_unit=bool(per_unit),
            latency_s=latency_s or 0.0,
            energy_pj_per_byte=energy,
            read_only=bool(read_only),
            persistent=persistent,
            copy_bytes_per_s=copy_bytes_per_s,
            first_touch_bytes_per_s=first_touch,
            first_touch_min_bytes=first_touch_min,
        )

    def links(self, data: Mapping[str, Any]) -> list[Link] | None:
        tables = self.array_of_tables(data, "links", required=False)
        if tables is None:
            return None if "links" in data else []
        raw_tiers = data.get("tiers")
        tier_names = {
            t["name"]
            for t in (raw_tiers if isinstance(raw_tiers, list) else [])
            if isinstance(t, dict) and isinstance(t.get("name"), str)
        }
        links: list[Link] = []
        pairs: dict[frozenset[str], int] = {}
        good = True
        for i, table in enumerate(tables):
            path = f"links[{i}]"
            before = len(self.problems)
            self.unknown_keys(table, LINK_KEYS, path)
            ends = [self.string(table, "src", path), self.string(table, "dst", path)]
            for key, end in zip(("src", "dst"), ends, strict=True):
                if end is not None and tier_names and end not in tier_names:
                    close = difflib.get_close_matches(end, sorted(tier_names), n=1)
                    fix = f"did you mean '{close[0]}'? " if close else ""
                    self.add(
                        f"{path}.{key}",
                        f"names unknown tier '{end}'",
                        f"{fix}tiers are: {', '.join(sorted(tier_names))}",
                    )
            src, dst = ends
            if src is not None and src == dst:
                self.add(path, f"links tier '{src}' to itself", "src and dst must differ")
            bytes_per_s = self.number(table, "bytes_per_s", path)
            if src is not None and dst is not None and src != dst:
                pair = frozenset((src, dst))
                if pair in pairs:
                    self.add(
                        path,
                        f"a link between '{src}' and '{dst}' is already declared "
                        f"(links[{pairs[pair]}])",
                        "links work both ways: declare each pair once",
                    )
                else:
                    pairs[pair] = i
            if len(self.problems) > before:
                good = False
                continue
            assert src is not None and dst is not None and bytes_per_s is not None
            links.append(Link(src=src, dst=dst, bytes_per_s=bytes_per_s))
        return links if good else None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def dumps_target(target: Target) -> str:
    """Write `target` as schema-v1 TOML text that `loads_target` reads back to an equal Target."""
    out: list[str] = ["# tiermap target file, schema v1 (see docs/architecture.md, 'Target files')"]
    out.append(f"name = {_toml_str(target.name)}")
    if target.description:
        out.append(f"description = {_toml_str(target.description)}")
    if target.sources:
        out.append("sources = [")
        out.extend(f"    {_toml_str(s)}," for s in target.sources)
        out.append("]")
    out.append(f"platform = {_toml_str(target.platform)}")
    out.append(f"op_overhead_s = {_toml_float(target.op_overhead_s)}")
    peaks = ", ".join(f"{k} = {_toml_float(v)}" for k, v in target.peak_flops_per_s.items())
    out += ["", "[compute]", f"peak_flops_per_s = {{ {peaks} }}", f"units = {target.units}"]
    if target.vector_peak_fraction != 1.0:
        out.append(f"vector_peak_fraction = {_toml_float(target.vector_peak_fraction)}")
    if target.transcendental_flops != 1.0:
        out.append(f"transcendental_flops = {_toml_float(target.transcendental_flops)}")
    if target.parallel_grain_elements != 0.0:
        out.append(f"parallel_grain_elements = {_toml_float(target.parallel_grain_elements)}")
    out += dump_calibrated_compute(target, _toml_float)
    for tier in target.tiers:
        out += ["", "[[tiers]]", f"name = {_toml_str(tier.name)}"]
        out.append(f"capacity_bytes = {tier.capacity_bytes:_}")
        out.append(f"per_unit = {str(tier.per_unit).lower()}")
        out.append(f"read_bytes_per_s = {_toml_float(tier.read_bytes_per_s)}")
        out.append(f"write_bytes_per_s = {_toml_float(tier.write_bytes_per_s)}")
        if tier.latency_s:
            out.append(f"latency_s = {_toml_float(tier.latency_s)}")
        if tier.energy_pj_per_byte is not None:
            out.append(f"energy_pj_per_byte = {_toml_float(tier.energy_pj_per_byte)}")
        if tier.read_only:
            out.append("read_only = true")
        if tier.persistent is not None:
            out.append(f"persistent = {str(tier.persistent).lower()}")
        if tier.copy_bytes_per_s is not None:
            out.append(f"copy_bytes_per_s = {_toml_float(tier.copy_bytes_per_s)}")
        if tier.first_touch_bytes_per_s is not None:
            out.append(f"first_touch_bytes_per_s = {_toml_float(tier.first_touch_bytes_per_s)}")
        if tier.first_touch_min_bytes is not None:
            out.append(f"first_touch_min_bytes = {tier.first_touch_min_bytes:_}")
    for link in target.links:
        out += ["", "[[links]]", f"src = {_toml_str(link.src)}", f"dst = {_toml_str(link.dst)}"]
        out.append(f"bytes_per_s = {_toml_float(link.bytes_per_s)}")
    out.extend(dumps_multichip(target.interconnect, _toml_str, _toml_float))
    return "\n".join(out) + "\n"


def _toml_str(value: str) -> str:
    # JSON escapes are valid TOML basic-string escapes; non-ASCII text is kept as is.
    return json.dumps(value, ensure_ascii=False)


def _toml_float(value: float) -> str:
    """The shortest text that reads back as exactly `value`; large and tiny ones as 1.5e+12."""
    value = float(value)
    text = repr(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot write a non-finite number ({text}) to a target file")
    if value != 0 and not 1e-4 <= abs(value) < 1e6:
        for digits in range(17):
            short = f"{value:.{digits}e}"
            if float(short) == value:
                return short
    return text
