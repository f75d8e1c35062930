"""Units, HTML tables and atomic files: what every user surface prints or writes with."""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Sequence

# --- units ---------------------------------------------------------------------------------------


def fmt_bytes(num_bytes: float) -> str:
    """Bytes with a binary prefix: 1536 -> "1.50 KiB"."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def fmt_time_s(time_s: float | None) -> str:
    """Seconds with an SI prefix: 1.2e-5 -> "12.0 µs"."""
    if time_s is None or not math.isfinite(time_s):
        return "-"
    if time_s == 0:
        return "0 s"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
        if abs(time_s) >= scale or unit == "ns":
            return f"{time_s / scale:.3g} {unit}"
    return f"{time_s:.3g} s"


def fmt_rate_bytes_per_s(rate_bytes_per_s: float) -> str:
    """Bandwidth with a decimal prefix: 1.6e12 -> "1.6 TB/s"."""
    for scale, unit in ((1e15, "PB/s"), (1e12, "TB/s"), (1e9, "GB/s"), (1e6, "MB/s")):
        if rate_bytes_per_s >= scale:
            return f"{rate_bytes_per_s / scale:.3g} {unit}"
    return f"{rate_bytes_per_s:.3g} B/s"


def fmt_flops_per_s(rate_flops_per_s: float) -> str:
    """FLOP/s with a decimal prefix: 3.12e14 -> "312 TFLOP/s"."""
    for scale, unit in ((1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s")):
        if rate_flops_per_s >= scale:
            return f"{rate_flops_per_s / scale:.3g} {unit}"
    return f"{rate_flops_per_s:.3g} FLOP/s"


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and `os.replace`.

    Readers never see a half-written file; the parent folder is created if missing.
    """
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table of escaped text cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
