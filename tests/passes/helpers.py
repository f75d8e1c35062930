"""Hand-built programs and targets for the placement tests: every expected time is worked out
by hand from round numbers (platform "tpu", one unit, so compute = flops / 1e12)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tiermap.hardware.target import Link, Target, Tier
from tiermap.ir.program import Op, Program, TensorType, Value

MIB = 1 << 20
FAST_BPS = 1e12
SLOW_BPS = 1e10
PEAK_FLOPS_PER_S = 1e12
SLOW_BYTES = 1_000_000_000


def two_tier(fast_bytes: int, *, energy: bool = False, link_bytes_per_s: float | None = None,
             overhead_s: float = 0.0) -> Target:
    """'fast' (1e12 B/s both ways) over 'slow' (1e10 B/s, 1 GB); link default = 1e10 B/s."""
    links = (Link("fast", "slow", link_bytes_per_s),) if link_bytes_per_s else ()
    return Target(
        name="hand-two-tier", description="hand-written placement test target", platform="tpu",
        peak_flops_per_s={"f32": PEAK_FLOPS_PER_S}, units=1,
        tiers=(Tier("fast", fast_bytes, FAST_BPS, FAST_BPS,
                    energy_pj_per_byte=1.0 if energy else None),
               Tier("slow", SLOW_BYTES, SLOW_BPS, SLOW_BPS,
                    energy_pj_per_byte=10.0 if energy else None)),
        links=links, op_overhead_s=overhead_s)


def sram_flash(sram_bytes: int, flash_bytes: int) -> Target:
    """A microcontroller: 'sram' (1e10 B/s) and read-only 'flash' (reads 1e9 B/s)."""
    return Target(
        name="hand-mcu", description="hand-written read-only test target", platform="tpu",
        peak_flops_per_s={"f32": PEAK_FLOPS_PER_S}, units=1,
        tiers=(Tier("sram", sram_bytes, 1e10, 1e10),
               Tier("flash", flash_bytes, 1e9, 2.5e5, read_only=True)))


def program(sizes: dict[str, int], inputs: Sequence[str],
            ops: Sequence[tuple[Sequence[str], Sequence[str], float]],
            outputs: Sequence[str], name: str = "hand") -> Program:
    """A straight-line program of f32 vectors: `sizes` in bytes (multiples of 4); op i reads
    its inputs whole, writes its outputs whole and does `flops`."""
    producer = {v: -1 for v in inputs}
    for step, (_ins, outs, _f) in enumerate(ops):
        for v in outs:
            producer[v] = step
    values = {v: Value(v, TensorType((sizes[v] // 4,), "f32"), producer[v]) for v in sizes}
    built = tuple(
        Op(id=f"op{step}", kind="stablehlo.add", step=step, inputs=tuple(ins),
           outputs=tuple(outs), flops=float(flops),
           bytes_read=sum(sizes[v] for v in ins), bytes_written=sum(sizes[v] for v in outs),
           attrs={"compute_dtype": "f32"})
        for step, (ins, outs, flops) in enumerate(ops))
    return Program(name=name, ops=built, values=values, inputs=tuple(inputs),
                   outputs=tuple(outputs), platform="tpu")


def strip_wall(text: str) -> Any:
    """Plan JSON without the keys that hold wall-clock times (the plan-JSON contract: all the
    rest is deterministic)."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if "wall" not in k}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(json.loads(text))


@contextmanager
def busy(processes: int) -> Iterator[None]:
    """`processes` Python loops spinning beside the caller (a machine under load)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(processes)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()
