"""tiermap.compiler: the frontend (StableHLO → IR), the IR, the pipeline driver and apply."""

from tiermap.compiler.frontend import lower, lower_mlir, program_from_module
from tiermap.compiler.ir import Op, Program, TensorType, Value

__all__ = ["Op", "Program", "TensorType", "Value", "lower", "lower_mlir", "program_from_module"]
