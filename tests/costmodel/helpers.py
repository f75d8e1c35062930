"""Hand-written targets and tiny programs for the cost-model tests."""

from __future__ import annotations

from collections.abc import Sequence

from tiermap.hardware.target import Link, Target, Tier
from tiermap.ir.plan import Residency
from tiermap.ir.program import Op, Program, TensorType, Value

# Two tiers with round numbers, so that every expected time in the tests is worked out by hand.
FAST_READ_BPS = 1e12
FAST_WRITE_BPS = 5e11
SLOW_READ_BPS = 1e11
SLOW_WRITE_BPS = 5e10
PEAK_F32 = 1e12
PEAK_BF16 = 4e12
OVERHEAD_S = 1e-6


def two_tier_target(platform: str = "tpu", overhead_s: float = OVERHEAD_S,
                    fast_bytes: int = 1 << 20, energy: bool = False,
                    link_bytes_per_s: float | None = None) -> Target:
    """'fast' (1 MiB, 1e12 B/s read, 5e11 write) over 'slow' (1 GB, 1e11 read, 5e10 write)."""
    links = (Link("fast", "slow", link_bytes_per_s),) if link_bytes_per_s else ()
    return Target(
        name="two-tier", description="hand-written test target", platform=platform,
        peak_flops_per_s={"f32": PEAK_F32, "bf16": PEAK_BF16}, units=1,
        tiers=(
            Tier("fast", fast_bytes, FAST_READ_BPS, FAST_WRITE_BPS,
                 energy_pj_per_byte=1.0 if energy else None),
            Tier("slow", 1_000_000_000, SLOW_READ_BPS, SLOW_WRITE_BPS,
                 energy_pj_per_byte=10.0 if energy else None),
        ),
        links=links, op_overhead_s=overhead_s,
    )


def cpu_like(target: Target) -> Target:
    """`target` with the compute figures measured for XLA's CPU backend (roofline.CPU_MEASURED)."""
    from dataclasses import replace

    from tiermap.costmodel.roofline import CPU_MEASURED

    return replace(
        target,
        vector_peak_fraction=CPU_MEASURED.vector_peak_fraction,
        transcendental_flops=CPU_MEASURED.transcendental_flops,
        parallel_grain_elements=CPU_MEASURED.parallel_grain_elements,
    )


def chain_program(nbytes: Sequence[int], flops: Sequence[float]) -> Program:
    """t0 -> op0 -> t1 -> op1 -> t2 ...: op i reads t_i and writes t_{i+1} (f32 vectors)."""
    values = {}
    for i, nb in enumerate(nbytes):
        values[f"t{i}"] = Value(f"t{i}", TensorType((nb // 4,), "f32"), i - 1)
    ops = tuple(
        Op(id=f"op{i}", kind="stablehlo.add", step=i, inputs=(f"t{i}",), outputs=(f"t{i + 1}",),
           flops=float(f), bytes_read=nbytes[i], bytes_written=nbytes[i + 1],
           attrs={"compute_dtype": "f32"})
        for i, f in enumerate(flops))
    return Program(name="chain", ops=ops, values=values, inputs=("t0",),
                   outputs=(f"t{len(flops)}",))


def everywhere(program: Program, tier: str) -> dict[str, list[Residency]]:
    """Every tensor resident in `tier` over its whole live range."""
    return {vid: [Residency(tier, *program.live_range(vid))] for vid in program.values}
