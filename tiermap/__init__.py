"""tiermap: map a JAX program's tensors to memory tiers (SRAM, HBM, DDR, flash).

Public surface (see ARCHITECTURE.md): `targets`, `target`, `lower`, `lower_mlir`, `plan`, `jit`,
`Plan`, `Program` and the errors. Heavy modules load on first use, so `import tiermap` is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tiermap.errors import (
    HardwareSpecError,
    InfeasiblePlacementError,
    PassError,
    TiermapError,
    UnsupportedProgramError,
    UserCodeError,
)
from tiermap.ir.plan import Plan
from tiermap.ir.program import Op, Program, TensorType, Value

if TYPE_CHECKING:
    from tiermap.hardware.target import Target

__version__ = "0.1.0"


def targets() -> list[str]:
    """Names of the built-in targets."""
    from tiermap.hardware.loader import builtin_target_names

    return builtin_target_names()


def target(name_or_path: str | Target) -> Target:
    """A built-in target by name, or a target file (.toml) by path."""
    from tiermap.hardware.loader import load_target

    return load_target(name_or_path)


def lower(fn: Callable[..., Any], *args: Any, platform: str = "cpu", **kwargs: Any) -> Program:
    """Trace `fn` on example arguments (arrays or ShapeDtypeStruct pytrees) into tiermap's IR."""
    from tiermap.frontend.stablehlo import lower as _lower

    return _lower(fn, *args, platform=platform, **kwargs)


def lower_mlir(text_or_path: str, name: str | None = None, platform: str = "cpu") -> Program:
    """tiermap's IR from a StableHLO module, as text or a path to a .mlir file."""
    from tiermap.frontend.stablehlo import lower_mlir as _lower_mlir

    return _lower_mlir(text_or_path, name=name, platform=platform)


def plan(fn_or_program: Callable[..., Any] | Program, *args: Any, target: str | Target = "cpu",
         strategy: str = "mip", time_limit_s: float = 30.0, seed: int = 0,
         objective: str = "time", **kwargs: Any) -> Plan:
    """Plan where every tensor lives on `target`: strategy "mip" | "greedy" | "naive"."""
    from tiermap.pipeline import plan as _plan

    return _plan(fn_or_program, *args, target=target, strategy=strategy,
                 time_limit_s=time_limit_s, seed=seed, objective=objective, **kwargs)


def jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Like `jax.jit`, but plans the program for `target=` and runs the planned program."""
    from tiermap.decorator import jit as _jit

    return _jit(fn, **options)


__all__ = [
    "HardwareSpecError", "InfeasiblePlacementError", "Op", "PassError", "Plan", "Program",
    "TensorType", "TiermapError", "UnsupportedProgramError", "UserCodeError", "Value",
    "jit", "lower", "lower_mlir", "plan", "target", "targets",
]
