"""The frontend's entry points: a JAX function, or a StableHLO module as text or a file → `Program`.

`lower(fn, *args)` traces a JAX function with
`jax.jit(fn).trace(...).lower(lowering_platforms=...)`; `lower_mlir(text_or_path)` takes a
StableHLO module from any producer. Both build the IR with `convert.program_from_module`; a
sharded function or module is compiled and read as its per-device program (`partitioned.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from tiermap.errors import UnsupportedProgramError, UserCodeError
from tiermap.frontend.convert import program_from_module
from tiermap.frontend.mlir import int_attr, parse_module, str_attr
from tiermap.frontend.partitioned import (
    compile_lowered,
    compile_sharded_mlir,
    has_sharded_leaf,
    num_partitions_of,
    program_from_compiled,
)
from tiermap.ir.program import Program


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and "{" not in text and (
        text.endswith((".mlir", ".stablehlo", ".txt")) or os.sep in text or os.path.exists(text))


def lower_mlir(text_or_path: str | os.PathLike[str], name: str | None = None,
               platform: str = "cpu") -> Program:
    """Build the IR from a StableHLO module given as text or as a path to a .mlir file."""
    text = os.fspath(text_or_path)
    if isinstance(text_or_path, os.PathLike) or _looks_like_path(text):
        path = text
        if not os.path.isfile(path):
            raise UnsupportedProgramError(f"{path}: no such file; fix: check the path")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        name = name or os.path.splitext(os.path.basename(path))[0]
    module = parse_module(text)
    with module.context:
        partitions = int_attr(module.operation, "mhlo.num_partitions", 1)
    if partitions > 1:
        # A sharded module: read the per-device program XLA makes of it, where it can be made.
        compiled = compile_sharded_mlir(text, partitions)
        if compiled is not None:
            return program_from_compiled(compiled, name=name or str_attr(module.operation,
                                                                         "sym_name") or "main",
                                         platform=platform)
    program = program_from_module(module, name=name, platform=platform)
    if partitions > 1:
        note = (f"frontend: {partitions} devices are needed to read the per-device program; "
                f"run with {partitions} (e.g. XLA_FLAGS="
                f"--xla_force_host_platform_device_count={partitions})")
        program = replace(program, assumptions=program.assumptions + (note,))
    return program


def _is_trace_error(exc: BaseException) -> bool:
    import jax

    trace_errors: tuple[type[BaseException], ...] = (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerBoolConversionError,
        jax.errors.TracerIntegerConversionError,
        jax.errors.NonConcreteBooleanIndexError,
        jax.errors.UnexpectedTracerError,
    )
    return isinstance(exc, trace_errors)


def stablehlo_for(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
                  platform: str | None = "cpu", static_argnums: Sequence[int] = (),
                  static_argnames: Sequence[str] = ()) -> Any:
    """Trace and lower `fn` for `platform` (None: for the devices of its shardings, the
    default backend); returns the jax `Lowered` stage.

    Raises:
        UnsupportedProgramError: `fn` cannot be traced to a static program (data-dependent
            Python control flow, value-dependent shapes) or JAX cannot lower it.
        UserCodeError: `fn` itself raised; wraps the original exception.
    """
    import jax

    fn_name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", type(fn).__name__)
    jitted = jax.jit(fn, static_argnums=tuple(static_argnums),
                     static_argnames=tuple(static_argnames))
    try:
        traced = jitted.trace(*args, **kwargs)
    except Exception as exc:
        if _is_trace_error(exc):
            first = str(exc).strip().splitlines()[0]
            raise UnsupportedProgramError(
                f"{fn_name}: cannot be traced to a static program: {first}. "
                "Fix: make shapes and control flow independent of array values "
                "(use lax.cond/lax.while_loop/jnp.where, or mark the argument static)."
            ) from exc
        raise UserCodeError(f"tracing {fn_name}", exc) from exc
    try:
        if platform is None:
            return traced.lower()
        return traced.lower(lowering_platforms=(platform,))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedProgramError(
            f"{fn_name}: JAX could not lower it for platform '{platform}': {first}"
        ) from exc


def lower(fn: Callable[..., Any], *args: Any, platform: str = "cpu",
          static_argnums: Sequence[int] = (), static_argnames: Sequence[str] = (),
          **kwargs: Any) -> Program:
    """Trace `fn` on example args (arrays or ShapeDtypeStruct pytrees) and build the IR.

    A sharded program (arguments sharded over several devices, or a module partitioned over
    several, e.g. by shard_map or with_sharding_constraint) is compiled on its devices and read
    as the per-device program XLA's SPMD partitioner made (`partitioned.py`)."""
    name = getattr(fn, "__name__", None) or "main"
    sharded = has_sharded_leaf((args, kwargs))
    lowered = stablehlo_for(fn, args, kwargs, None if sharded else platform, static_argnums,
                            static_argnames)
    if sharded or num_partitions_of(lowered) > 1:
        if not sharded:  # lowered for `platform`: lower again for the mesh's own devices
            lowered = stablehlo_for(fn, args, kwargs, None, static_argnums, static_argnames)
        return program_from_compiled(compile_lowered(lowered, fn), name=name, platform=platform)
    module = lowered.compiler_ir("stablehlo")
    return program_from_module(module, name=name, platform=platform)
