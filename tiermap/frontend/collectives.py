"""The collectives of a partitioned program: who talks to whom and how many bytes.

XLA writes the device groups of a collective as `replica_groups`: a dense [groups, size] array of
device ids, empty for "every device", or (Shardy) the mesh axes the group spans. A
`collective_permute` has `source_target_pairs` instead. `payload_bytes` is the collective's whole
buffer on one device, as in the HLO: the result of an all-gather, the operand(s) of the others.
"""

from __future__ import annotations

import re
from typing import Any

from tiermap.frontend.mlir import op_attr, str_attr
from tiermap.ir.program import TensorType

_MESH_AXIS = re.compile(r'"?([\w.]+)"?\s*=\s*(\d+)')
_AXIS_REF = re.compile(r'axis_ref<name = "([^"]+)"(?:, sub_axis_info = <\s*(\d+)\s*,\s*(\d+)>)?')


def module_meshes(module: Any) -> dict[str, dict[str, int]]:
    """The `sdy.mesh` declarations of a module: mesh name -> axis name -> size."""
    meshes: dict[str, dict[str, int]] = {}
    for wrapped in module.body.operations:
        op = wrapped.operation
        if op.name != "sdy.mesh":
            continue
        text = str(op_attr(op, "mesh"))
        meshes[str_attr(op, "sym_name")] = {m.group(1): int(m.group(2))
                                            for m in _MESH_AXIS.finditer(text)}
    return meshes


def _group_shape(op: Any, num_devices: int, meshes: dict[str, dict[str, int]]
                 ) -> tuple[int, int]:
    """(number of groups, devices per group) of a collective's `replica_groups`."""
    attr = op_attr(op, "replica_groups")
    if attr is None:
        return 1, num_devices
    text = str(attr)
    if "replica_group_mesh_axes" in text:
        mesh_name = re.search(r"mesh = @([\w.]+)", text)
        axes = meshes.get(mesh_name.group(1) if mesh_name else "", {})
        size = 1
        for ref in _AXIS_REF.finditer(text):
            size *= int(ref.group(3)) if ref.group(3) else axes.get(ref.group(1), 1)
        size = max(size, 1)
        return max(num_devices // size, 1), size
    shape = re.search(r":\s*tensor<(\d+)x(\d+)x", text)
    if shape is None:
        return 1, num_devices
    groups, size = int(shape.group(1)), int(shape.group(2))
    if groups == 0 or size == 0:  # empty: one group of every device
        return 1, num_devices
    return groups, size


def collective_attrs(op: Any, short: str, ins: list[TensorType], outs: list[TensorType],
                     num_devices: int, meshes: dict[str, dict[str, int]]) -> dict[str, Any]:
    """`group_size`, `num_groups` and `payload_bytes` of one collective op."""
    if short == "collective_permute":
        pairs = op_attr(op, "source_target_pairs")
        match = re.search(r":\s*tensor<(\d+)x2x", str(pairs)) if pairs is not None else None
        pair_count = int(match.group(1)) if match else num_devices
        groups, size = 1, max(pair_count, 1)
    else:
        groups, size = _group_shape(op, num_devices, meshes)
    chosen = outs if short == "all_gather" else ins
    payload = sum(t.nbytes for t in chosen)
    return {"collective": short, "group_size": size, "num_groups": groups,
            "payload_bytes": int(payload)}
