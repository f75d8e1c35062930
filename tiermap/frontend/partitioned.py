"""Sharded programs: the per-device program XLA's SPMD partitioner makes → `Program`.

A function whose arguments are sharded over several devices (`NamedSharding`,
`with_sharding_constraint`, `shard_map`) is compiled with `jax.jit(fn).lower(*args).compile()` on
the devices of its shardings. The compiled executable's HLO module is the partitioned program
one device runs: per-device shapes, and the collectives the partitioner inserted (all-reduce,
all-gather, reduce-scatter, all-to-all, collective-permute), after XLA's optimisation passes
(collective combining, reduce-scatter formation, fusion). jaxlib converts that module to
StableHLO (`hlo_to_stablehlo`); its `mhlo.fusion`s are inlined by the walker, so the IR holds
the unfused ops, as for a one-device program, and tiermap's own passes fuse again.

A sharded StableHLO module (text or file with `mhlo.num_partitions` > 1) is compiled the same way
(`compile_sharded_mlir`) when the default backend has that many devices.

The program is XLA's *for the backend of those devices* (here: host CPU devices): partitioning
is the same pass on every backend, but later passes (fusion, combining thresholds) are not.
"""

from __future__ import annotations

import re
from typing import Any

from tiermap.errors import UnsupportedProgramError
from tiermap.frontend.convert import program_from_module
from tiermap.frontend.mlir import _ir_context, int_attr
from tiermap.ir.program import Program


def num_partitions_of(lowered: Any) -> int:
    """How many devices a jax `Lowered` stage partitions its program over."""
    module = lowered.compiler_ir("stablehlo")
    with module.context:
        return int_attr(module.operation, "mhlo.num_partitions", 1)


def has_sharded_leaf(tree: Any) -> bool:
    """Whether some leaf of `tree` (arrays, ShapeDtypeStructs) is sharded over >1 device."""
    import jax

    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        devices = getattr(sharding, "device_set", None)
        if devices is not None and len(devices) > 1:
            return True
    return False


def partitioned_module(compiled: Any) -> Any:
    """The partitioned HLO module of a jax `Compiled` stage (or of a loaded executable), as a
    parsed StableHLO module."""
    from jax._src.lib import _jax  # jaxlib's HLO -> StableHLO converter (no public alias)
    from jaxlib.mlir import ir

    executable = (compiled.runtime_executable() if hasattr(compiled, "runtime_executable")
                  else compiled)
    modules = executable.hlo_modules()
    if len(modules) != 1:
        raise UnsupportedProgramError(
            f"the compiled program has {len(modules)} HLO modules; tiermap reads one "
            "(a single jitted step)")
    bytecode = _jax.mlir.hlo_to_stablehlo(modules[0].as_serialized_hlo_module_proto())
    ctx = _ir_context()
    with ctx:
        try:
            return ir.Module.parse(bytecode)
        except ir.MLIRError:
            pass
    # jaxlib's converter writes some iota replica groups as Shardy mesh axes on mhlo ops that
    # do not verify (seen on all-to-all); listing the groups in the HLO text avoids that form.
    # hlo_module_from_text: the HLO text parser jaxlib ships (untyped)
    from jaxlib import _hlo  # type: ignore[attr-defined]

    text = explicit_replica_groups(modules[0].to_string())
    proto = _hlo.hlo_module_from_text(text).as_serialized_hlo_module_proto()
    with ctx:
        return ir.Module.parse(_jax.mlir.hlo_to_stablehlo(proto))


_IOTA_GROUPS = re.compile(
    r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'([^']+)'\s*=\s*(\d+)")


def _groups_text(rows: Any) -> str:
    return "replica_groups={" + ",".join(
        "{" + ",".join(str(int(x)) for x in row) + "}" for row in rows) + "}"


def explicit_replica_groups(hlo_text: str) -> str:
    """HLO text with every iota replica group list (`[2,4]<=[8]`, `[4,2]<=[2,4]T(1,0)`) and every
    mesh-axes group (`mesh['a'=2,'b'=4] {'b'}`) written out as explicit groups
    (`{{0,1,2,3},{4,5,6,7}}`)."""
    import numpy as np

    def expand_mesh(m: re.Match[str]) -> str:
        axes = [(name, int(size)) for name, size in _MESH_AXIS.findall(m.group(1))]
        chosen = re.findall(r"'([^']+)'", m.group(2))
        names = [a for a, _ in axes]
        if not axes or any(c not in names for c in chosen):
            return m.group(0)
        ids = np.arange(int(np.prod([d for _, d in axes]))).reshape([d for _, d in axes])
        keep = [i for i, a in enumerate(names) if a not in chosen]
        group_axes = [names.index(c) for c in chosen]
        size = int(np.prod([axes[i][1] for i in group_axes])) if group_axes else 1
        return _groups_text(ids.transpose(keep + group_axes).reshape(-1, size))

    def expand(m: re.Match[str]) -> str:
        groups, size = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(d) for d in m.group(4).split(",")])
        return _groups_text(ids.reshape(groups, size))

    return _MESH_GROUPS.sub(expand_mesh, _IOTA_GROUPS.sub(expand, hlo_text))


def program_from_compiled(compiled: Any, name: str = "main", platform: str = "cpu") -> Program:
    """The IR of a compiled (partitioned) jax program, or of a loaded executable: one device's
    program."""
    module = partitioned_module(compiled)
    with module.context:
        devices = int_attr(module.operation, "mhlo.num_partitions", 0)
    if devices <= 0:
        executable = (compiled.runtime_executable()
                      if hasattr(compiled, "runtime_executable") else compiled)
        devices = _num_devices(executable.hlo_modules()[0].to_string())
    return program_from_module(module, name=name, platform=platform, num_devices=devices)


def _num_devices(hlo_text: str) -> int:
    head = hlo_text.split("\n", 1)[0]
    marker = "num_partitions="
    if marker not in head:
        return 1
    return int(head.split(marker, 1)[1].split(",")[0].split()[0])


def compile_sharded_mlir(text: str, num_devices: int) -> Any | None:
    """Compile a partitioned StableHLO module (`mhlo.num_partitions` = `num_devices`) with XLA on
    the default backend's first `num_devices` devices; None when there are fewer devices."""
    import jax.extend
    import numpy as np
    from jax._src import compiler  # get_compile_options: the options jax.jit compiles with
    from jax._src.lib import xla_client

    backend = jax.extend.backend.get_backend()
    devices = backend.devices()
    if len(devices) < num_devices:
        return None
    options = compiler.get_compile_options(
        num_replicas=1, num_partitions=num_devices,
        device_assignment=np.arange(num_devices).reshape(1, num_devices), backend=backend)
    try:
        return backend.compile_and_load(text, xla_client.DeviceList(tuple(devices[:num_devices])),
                                        options)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedProgramError(
            f"XLA could not compile the sharded module for {num_devices} devices: {first}"
        ) from exc


def compile_lowered(lowered: Any, fn: Any) -> Any:
    """`lowered.compile()`, with XLA's failures as UnsupportedProgramError."""
    try:
        return lowered.compile()
    except Exception as exc:
        fn_name = getattr(fn, "__name__", type(fn).__name__)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedProgramError(
            f"{fn_name}: XLA could not compile the sharded program: {first}. Fix: check that "
            "the mesh's devices exist (XLA_FLAGS=--xla_force_host_platform_device_count=8 "
            "for 8 host devices)") from exc
