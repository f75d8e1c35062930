"""Memory placement: program inputs that the plan keeps in a host tier go to host memory.

Such inputs are placed in host memory (`memory_kind="pinned_host"`) where the device has that
memory, and moved to device memory inside the program; on backends without it they stay in
device memory (with a note).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import SingleDeviceSharding

from tiermap.ir.plan import Plan

NO_HOST_KIND_NOTE = ("host-tier inputs: this backend has no pinned_host memory kind; "
                     "inputs stay in device memory")


def host_input_positions(plan: Plan) -> list[int]:
    """Positions (among the program's inputs) of inputs the plan keeps in a host tier at step 0.

    A host tier is a residency tier slower than the target's main-memory tier.
    """
    program = plan.program
    if program is None:
        return []
    names = [t.name for t in plan.target.tiers]
    main = names.index(plan.target.main_tier.name)
    slow = {n for i, n in enumerate(names) if i > main}
    by_id = {t.id: t for t in plan.tensors}
    out = []
    for pos, vid in enumerate(program.inputs):
        t = by_id.get(vid)
        if t is None or not t.residency:
            continue
        first = min(t.residency, key=lambda r: r.from_step)
        if first.tier in slow:
            out.append(pos)
    return out


def host_note(positions: list[int]) -> str:
    """The note saying where the host-tier inputs at `positions` went."""
    return (f"inputs {positions} planned in a host tier: placed in pinned_host "
            "memory and moved to device memory inside the program")


def host_kind_available() -> bool:
    """Whether the first device has both pinned_host and device memory."""
    try:
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    except Exception:  # noqa: BLE001 - backends without memories API
        return False
    return "pinned_host" in kinds and "device" in kinds


def to_device_memory(leaves: list[Any], positions: list[int]) -> list[Any]:
    """Inside the program: the host-tier leaves at `positions` moved to device memory (all
    leaves unchanged where there are none or the backend has no host memory kind)."""
    if not positions or not host_kind_available():
        return leaves
    dev = jax.devices()[0]
    out = list(leaves)
    for pos in positions:
        if pos < len(out):
            out[pos] = jax.device_put(out[pos], SingleDeviceSharding(dev, memory_kind="device"))
    return out


def to_host_memory(leaves: list[Any], positions: list[int]) -> list[Any]:
    """Before the call: the array leaves at `positions` placed in pinned_host memory (a
    `jax.ShapeDtypeStruct` gets that sharding, for lowering; a tracer is left as it is)."""
    dev = jax.devices()[0]
    host = SingleDeviceSharding(dev, memory_kind="pinned_host")
    out = list(leaves)
    for pos in positions:
        if pos < len(out) and isinstance(out[pos], jax.ShapeDtypeStruct):
            out[pos] = jax.ShapeDtypeStruct(out[pos].shape, out[pos].dtype, sharding=host)
        elif (pos < len(out) and hasattr(out[pos], "shape")
              and not isinstance(out[pos], jax.core.Tracer)):
            # A traced leaf (a call under jax.grad or an outer jit) stays where the outer
            # computation has it: its cotangent must live where the primal's consumer does.
            out[pos] = jax.device_put(out[pos], host)
    return out
