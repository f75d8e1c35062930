"""The plan's predicted device memory against what XLA allocates for the applied program.

`memory_check(plan, compiled)` compares the plan's peak bytes resident in device memory (the
target's main-memory tier and every faster tier that holds tensors across ops; per-unit
scratchpads and host tiers are not device memory in this sense) with XLA's
`compiled.memory_analysis()` of the program as applied: arguments + outputs + temporaries −
aliased bytes, the peak XLA's buffer assignment can need at once. XLA compiles for its own
platform (the CPU here, whatever the target), so the two agree only as far as the platform's
buffers follow the plan; the check says which platform compiled it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tiermap.ir.plan import Plan, occupancy_bytes


@dataclass(frozen=True)
class MemoryCheck:
    """Predicted against compiled device memory, in bytes.

    Attributes:
        predicted_peak_bytes: the plan's peak over steps of the bytes resident in its device
            tiers (`device_tiers`).
        device_tiers: the tiers counted.
        argument_bytes, output_bytes, temp_bytes, alias_bytes: XLA's memory analysis.
        compiled_peak_bytes: arguments + outputs + temporaries − aliased.
        platform: the platform XLA compiled for.
    """

    predicted_peak_bytes: int
    device_tiers: tuple[str, ...]
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    compiled_peak_bytes: int
    platform: str

    @property
    def ratio(self) -> float:
        """compiled / predicted (1.0 where they agree)."""
        return self.compiled_peak_bytes / max(self.predicted_peak_bytes, 1)

    def describe(self) -> str:
        return (f"device memory: plan peak {self.predicted_peak_bytes} B in "
                f"{'+'.join(self.device_tiers)}; XLA ({self.platform}) arguments "
                f"{self.argument_bytes} + outputs {self.output_bytes} + temporaries "
                f"{self.temp_bytes} - aliased {self.alias_bytes} = {self.compiled_peak_bytes} B "
                f"({self.ratio:.2f}x the plan)")


def device_tiers(plan: Plan) -> tuple[str, ...]:
    """The plan's device-memory tiers: the main-memory tier and the faster tiers that hold
    tensors (not per-unit scratchpads)."""
    main = plan.target.main_tier.name
    out = []
    for tier in plan.target.tiers:
        if tier.holds_tensors and not tier.per_unit:
            out.append(tier.name)
        if tier.name == main:
            break
    return tuple(out) or (main,)


def memory_check(plan: Plan, compiled: Any) -> MemoryCheck:
    """`MemoryCheck` of `plan` against `compiled` (a `jax.stages.Compiled`)."""
    tiers = device_tiers(plan)
    occ = occupancy_bytes(plan)
    steps = max(plan.num_steps, 1)
    per_step = [sum(occ.get(t, [0] * steps)[s] for t in tiers) for s in range(steps)]
    stats = compiled.memory_analysis()
    arguments = int(getattr(stats, "argument_size_in_bytes", 0))
    outputs = int(getattr(stats, "output_size_in_bytes", 0))
    temps = int(getattr(stats, "temp_size_in_bytes", 0))
    alias = int(getattr(stats, "alias_size_in_bytes", 0))
    try:
        platform = str(compiled.runtime_executable().client.platform)
    except Exception:  # noqa: BLE001 - not every backend exposes its client
        platform = "unknown"
    return MemoryCheck(predicted_peak_bytes=int(max(per_step, default=0)), device_tiers=tiers,
                       argument_bytes=arguments, output_bytes=outputs, temp_bytes=temps,
                       alias_bytes=alias, compiled_peak_bytes=arguments + outputs + temps - alias,
                       platform=platform)
