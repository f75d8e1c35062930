"""tiermap.costmodel: op costs (flops, bytes), roofline, IO lower bounds and plan evaluation."""

from tiermap.costmodel.cost import Cost
from tiermap.costmodel.evaluate import Evaluation, evaluate
from tiermap.costmodel.io_bounds import (
    attention_io_lower_bound_bytes,
    flash_attention_blocks,
    flash_attention_traffic_bytes,
    matmul_io_lower_bound_bytes,
    softmax_passes,
    tiled_matmul_traffic_bytes,
)
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
    "attention_io_lower_bound_bytes",
    "compute_time_s",
    "evaluate",
    "flash_attention_blocks",
    "flash_attention_traffic_bytes",
    "group_cost",
    "matmul_io_lower_bound_bytes",
    "op_cost",
    "operand_read_bytes",
    "result_write_bytes",
    "softmax_passes",
    "tiled_matmul_traffic_bytes",
    "transfer_time_s",
]
