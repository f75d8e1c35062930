"""tiermap's IR, as plain data: `Program` (program.py), op classes (ops.py), fusion decisions
(fusion.py) and the plan's data and JSON form (plan.py). Nothing here verifies, reports or touches
MLIR; those live in the layers above."""
