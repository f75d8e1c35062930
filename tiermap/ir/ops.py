"""Classes of StableHLO op kinds: elementwise math, transcendental, data movement, free.

Facts about op kinds that several layers use: the frontend costs ops by them, fusion decides what
fuses as a loop body by them. Entries are short kinds, `Op.kind` without its "stablehlo." prefix.
The classes follow XLA's HloCostAnalysis conventions.
"""

from __future__ import annotations

TRANSCENDENTAL = frozenset({
    "exponential", "exponential_minus_one", "log", "log_plus_one", "logistic", "sqrt", "rsqrt",
    "cbrt", "tanh", "sine", "cosine", "tan", "atan2", "power", "erf",
})
ELEMENTWISE = frozenset({
    "add", "subtract", "multiply", "divide", "remainder", "maximum", "minimum", "negate", "abs",
    "sign", "floor", "ceil", "round_nearest_afz", "round_nearest_even", "and", "or", "xor", "not",
    "shift_left", "shift_right_arithmetic", "shift_right_logical", "compare", "select", "clamp",
    "convert", "is_finite", "popcnt", "count_leading_zeros", "real", "imag", "complex",
    "reduce_precision", "bitcast_convert",
})
# Data movement: no flops; compulsory traffic is reading what is used and writing the result.
MOVEMENT = frozenset({
    "broadcast_in_dim", "broadcast", "transpose", "slice", "concatenate", "pad", "reverse",
    "iota", "constant", "copy", "dynamic_slice", "dynamic_update_slice", "gather",
    "get_tuple_element", "tuple", "optimization_barrier", "real_dynamic_slice", "after_all",
    "create_token", "partition_id", "replica_id", "get_dimension_size", "reshape",
    "bitcast",
})
# `bitcast` (mhlo, in XLA's optimised programs) reinterprets a buffer's shape, like a reshape.
FREE_KINDS = frozenset({"reshape", "get_tuple_element", "tuple", "optimization_barrier",
                        "after_all", "create_token", "partition_id", "replica_id", "bitcast"})
# Collectives XLA's SPMD partitioner inserts: each moves bytes between devices over the
# interconnect (tiermap/hardware/interconnect.py prices them); `Op.attrs` holds "group_size",
# "num_groups" and "payload_bytes" (the frontend's collectives.py).
COLLECTIVES = frozenset({"all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                         "collective_permute"})
