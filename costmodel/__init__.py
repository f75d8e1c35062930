"""tiermap.costmodel: op costs (flops, bytes), roofline, IO lower bounds and plan evaluation."""

from tiermap.costmodel.cost import Cost
from tiermap.costmodel.evaluate import Evaluation, build_plan, evaluate
from tiermap.costmodel.roofline import (
    compute_time_s,
    group_cost,
    op_cost,
    operand_read_bytes,
    result_write_bytes,
    transfer_time_s,
)

__all__ = [
    "Cost",
    "Evaluation",
    "build_plan",
    "compute_time_s",
    "evaluate",
    "group_cost",
    "op_cost",
    "operand_read_bytes",
    "result_write_bytes",
    "transfer_time_s",
]
