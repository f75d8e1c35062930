"""tiermap: map a JAX program's tensors to memory tiers (SRAM, HBM, DDR, flash)."""

from tiermap.compiler.frontend import lower_mlir
from tiermap.compiler.ir import Op, Program, TensorType, Value
from tiermap.errors import (
    HardwareSpecError,
    InfeasiblePlacementError,
    PassError,
    TiermapError,
    UnsupportedProgramError,
    UserCodeError,
)


def lower(fn, *args, platform: str = "cpu", **kwargs) -> Program:  # type: ignore[no-untyped-def]
    """Trace `fn` on example arguments and build tiermap's IR (see tiermap.compiler.frontend)."""
    from tiermap.compiler.frontend import lower as _lower

    return _lower(fn, *args, platform=platform, **kwargs)


__all__ = [
    "HardwareSpecError", "InfeasiblePlacementError", "Op", "PassError", "Program", "TensorType",
    "TiermapError", "UnsupportedProgramError", "UserCodeError", "Value", "lower", "lower_mlir",
]
