"""The optional [compute] keys of a calibrated CPU target: reading, checking and writing them.

`tiermap calibrate` writes them (tiermap/costmodel/calibration.py); the working-set cost model
(tiermap/costmodel/working_set.py) reads them. Every key is optional, so older files load as
before. Schema (units in the names; docs/architecture.md, "Target files"):

```toml
[compute]
working_set_tiers = true                    # charge bytes at the tier the working set fits in
reduce_flops_per_s = 3.0e10                 # a reduce's body flops per second
convolution_units = 1                       # units one convolution keeps busy
transcendental_per_s = { exponential = 4.7e9, tanh = 4.1e9, erf = 3.9e9, log = 4.0e9 }

[compute.matmul_flops_per_s]                # [n, FLOP/s of an n x n x n matmul] by dtype
f32 = [[64, 3.1e10], [256, 1.6e11], [1024, 3.5e11]]
```
and per tier, `copy_bytes_per_s` (bytes read plus written per second by a copy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

CALIBRATED_COMPUTE_KEYS = (
    "working_set_tiers", "reduce_flops_per_s", "transcendental_per_s", "matmul_flops_per_s",
    "convolution_units",
)

_MATMUL_HINT = "a table of [n, FLOP/s] pairs by dtype, e.g. matmul_flops_per_s = " \
    "{ f32 = [[64, 3e10], [512, 3e11]] }"
_TRANS_HINT = "elements per second by op kind, e.g. transcendental_per_s = { exponential = 4e9 }"


class Checker(Protocol):
    """The loader's problem collector (tiermap/hardware/loader.py, `_Checker`)."""

    def add(self, key_path: str, problem: str, fix: str | None = None) -> None: ...

    def boolean(self, table: Mapping[str, Any], key: str, path: str) -> bool | None: ...

    def number(self, table: Mapping[str, Any], key: str, path: str, required: bool = True,
               allow_zero: bool = False, hint: str | None = None) -> float | None: ...


def read_calibrated_compute(checker: Checker, compute: Mapping[str, Any],
                            peak_dtypes: frozenset[str]) -> dict[str, Any]:
    """The calibrated [compute] keys present in `compute`, checked; problems go to `checker`.

    Returns keyword arguments for `Target` (only the keys present and valid).
    """
    out: dict[str, Any] = {}
    flag = checker.boolean(compute, "working_set_tiers", "compute")
    if flag is not None:
        out["working_set_tiers"] = flag
    rate = checker.number(compute, "reduce_flops_per_s", "compute", required=False,
                          hint="FLOP/s of a reduction's body, e.g. reduce_flops_per_s = 3e10")
    if rate is not None:
        out["reduce_flops_per_s"] = rate
    conv_units = compute.get("convolution_units")
    if conv_units is not None:
        if _positive_int(conv_units):
            out["convolution_units"] = int(conv_units)
        else:
            checker.add("compute.convolution_units", f"must be an integer >= 1, got {conv_units!r}",
                        "units one convolution keeps busy, e.g. convolution_units = 1")
    trans = compute.get("transcendental_per_s")
    if trans is not None:
        if not isinstance(trans, dict) or not trans:
            checker.add("compute.transcendental_per_s", "must be a non-empty table", _TRANS_HINT)
        else:
            rates: dict[str, float] = {}
            for kind in trans:
                value = checker.number(trans, kind, "compute.transcendental_per_s",
                                       hint=_TRANS_HINT)
                if value is not None:
                    rates[str(kind)] = value
            out["transcendental_per_s"] = rates
    matmul = compute.get("matmul_flops_per_s")
    if matmul is not None:
        table = _matmul_table(checker, matmul, peak_dtypes)
        if table is not None:
            out["matmul_flops_per_s"] = table
    return out


def _matmul_table(checker: Checker, value: Any, peak_dtypes: frozenset[str]
                  ) -> dict[str, tuple[tuple[int, float], ...]] | None:
    path = "compute.matmul_flops_per_s"
    if not isinstance(value, dict) or not value:
        checker.add(path, "must be a non-empty table", _MATMUL_HINT)
        return None
    out: dict[str, tuple[tuple[int, float], ...]] = {}
    for dtype, points in value.items():
        key_path = f"{path}.{dtype}"
        if dtype not in peak_dtypes:
            checker.add(key_path, "unknown dtype", "use an IR dtype name such as f32 or bf16")
            continue
        good = isinstance(points, list) and bool(points) and all(
            isinstance(p, list) and len(p) == 2 and _positive_int(p[0]) and _positive_num(p[1])
            for p in points)
        if not good:
            checker.add(key_path, "must be a non-empty list of [n, FLOP/s] pairs, n an integer "
                        "> 0 and FLOP/s > 0", _MATMUL_HINT)
            continue
        sizes = [int(p[0]) for p in points]
        if sizes != sorted(set(sizes)):
            checker.add(key_path, f"sizes must be distinct and ascending, got {sizes}",
                        "list the [n, FLOP/s] pairs by n, smallest first")
            continue
        out[str(dtype)] = tuple((int(p[0]), float(p[1])) for p in points)
    return out


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_num(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and value > 0 and value != float("inf"))


def dump_calibrated_compute(target: Any, fmt: Callable[[float], str]) -> list[str]:
    """TOML lines for the calibrated [compute] keys `target` sets (none for other targets)."""
    out: list[str] = []
    if target.working_set_tiers:
        out.append("working_set_tiers = true")
    if target.reduce_flops_per_s:
        out.append(f"reduce_flops_per_s = {fmt(target.reduce_flops_per_s)}")
    if target.convolution_units:
        out.append(f"convolution_units = {int(target.convolution_units)}")
    if target.transcendental_per_s:
        rates = ", ".join(f"{k} = {fmt(v)}" for k, v in target.transcendental_per_s.items())
        out.append(f"transcendental_per_s = {{ {rates} }}")
    if target.matmul_flops_per_s:  # a sub-table: it must come after the other [compute] keys
        out += ["", "[compute.matmul_flops_per_s]  # [n, FLOP/s of an n x n x n matmul]"]
        for dtype, points in target.matmul_flops_per_s.items():
            pairs = ", ".join(f"[{n}, {fmt(rate)}]" for n, rate in points)
            out.append(f"{dtype} = [{pairs}]")
    return out
