"""tiermap: map a JAX program's tensors to memory tiers (SRAM, HBM, DDR, flash).

Public surface (see docs/architecture.md): `targets`, `target`, `lower`, `lower_mlir`, `plan`,
`jit`, `Plan`, `Program` and the errors. jax, jaxlib's MLIR bindings, OR-tools and matplotlib
load on first use inside the modules that need them, so `import tiermap` is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tiermap.decorator import jit as _jit
from tiermap.errors import (
    HardwareSpecError,
    InfeasiblePlacementError,
    PassError,
    TiermapError,
    UnsupportedProgramError,
    UserCodeError,
)
from tiermap.frontend.lowering import lower as _lower
from tiermap.frontend.lowering import lower_mlir as _lower_mlir
from tiermap.hardware.loader import builtin_target_names, load_target
from tiermap.hardware.target import Target
from tiermap.ir.program import Op, Program, TensorType, Value
from tiermap.options import DEFAULT_TIME_LIMIT_S
from tiermap.pipeline import plan as _plan
from tiermap.plan_views import Plan

__version__ = "0.1.0"


def targets() -> list[str]:
    """Names of the built-in targets."""
    return builtin_target_names()


def target(name_or_path: str | Target) -> Target:
    """A built-in target by name, or a target file (.toml) by path."""
    return load_target(name_or_path)


def lower(fn: Callable[..., Any], *args: Any, platform: str = "cpu", **kwargs: Any) -> Program:
    """Trace `fn` on example arguments (arrays or ShapeDtypeStruct pytrees) into tiermap's IR."""
    return _lower(fn, *args, platform=platform, **kwargs)


def lower_mlir(text_or_path: str, name: str | None = None, platform: str = "cpu") -> Program:
    """tiermap's IR from a StableHLO module, as text or a path to a .mlir file."""
    return _lower_mlir(text_or_path, name=name, platform=platform)


def plan(fn_or_program: Callable[..., Any] | Program, *args: Any, target: str | Target = "cpu",
         strategy: str = "mip", time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0,
         objective: str = "time", **kwargs: Any) -> Plan:
    """Plan where every tensor lives on `target`: strategy "mip" | "greedy" | "naive"."""
    return _plan(fn_or_program, *args, target=target, strategy=strategy,
                 time_limit_s=time_limit_s, seed=seed, objective=objective, **kwargs)


def jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Like `jax.jit`, but plans the program for `target=` and runs the planned program."""
    return _jit(fn, **options)


__all__ = [
    "HardwareSpecError", "InfeasiblePlacementError", "Op", "PassError", "Plan", "Program",
    "Target", "TensorType", "TiermapError", "UnsupportedProgramError", "UserCodeError", "Value",
    "jit", "lower", "lower_mlir", "plan", "target", "targets",
]
