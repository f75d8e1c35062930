"""StableHLO → tiermap IR, the only layer that touches MLIR.

`lowering` holds the entry points (`lower` for a JAX function, `lower_mlir` for module text or a
file), `convert` builds a `Program` from a parsed module (`program_from_module`) with `walk`,
`folds` and `costs`, `mlir` reads modules with jaxlib's bindings, and `annotate` writes
`tiermap.*` attributes back onto a program's source module.
"""

from tiermap.frontend.convert import program_from_module
from tiermap.frontend.lowering import lower, lower_mlir

__all__ = ["lower", "lower_mlir", "program_from_module"]
