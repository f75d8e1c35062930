"""FLOPs and bytes of one execution of a StableHLO op.

FLOPs follow XLA's HloCostAnalysis run on the HLO that XLA converts the module into, so that
`Program.flops_one_trip` agrees with `jax.jit(fn).lower(*args).cost_analysis()["flops"]`: one flop
per element of an elementwise op (transcendentals apart), 2·out·k for a dot, 2 per valid kernel
tap for a convolution, (in − out)·body for a reduce, out·(window − 1)·body for a reduce_window,
n·⌈log2 n⌉ for a sort, measured per-element costs for the chlo ops XLA expands (`CHLO_COST`).
Reducers (`reduce`, `reduce_window`, `scatter`, `select_and_scatter`, `map`, `sort`) cost their
scalar body per application.

Bytes are each op's compulsory traffic when run alone: what it must read of its operands and write
of its results (a slice or gather reads what it returns, a reshape is free).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from tiermap.errors import UnsupportedProgramError
from tiermap.frontend.mlir import int_attr, ints, op_attr, str_attr, tensor_type
from tiermap.ir.ops import COLLECTIVES, ELEMENTWISE, FREE_KINDS, MOVEMENT, TRANSCENDENTAL
from tiermap.ir.program import TensorType

# chlo ops that XLA expands into HLO: (flops, transcendentals) per output element, measured with
# XLA's cost analysis on single-op modules (jaxlib 0.10.2). Keys: op, then "f32" (also the
# default), "half" (f16/bf16: the expansion computes in f32 with two extra converts) and "f64".
CHLO_COST: dict[str, dict[str, tuple[float, float]]] = {
    "acos": {"f32": (3, 2)}, "acosh": {"f32": (7, 4)}, "asin": {"f32": (5, 2)},
    "asinh": {"f32": (11, 3)}, "atan": {"f32": (0, 1)}, "atanh": {"f32": (6, 2)},
    "bessel_i1e": {"f32": (83, 1), "half": (85, 1), "f64": (173, 1)},
    "conj": {"f32": (0, 0)},
    "cosh": {"f32": (3, 2), "half": (5, 2)}, "sinh": {"f32": (10, 3), "half": (12, 3)},
    "tan": {"f32": (0, 1)},
    "digamma": {"f32": (73, 3), "half": (75, 3)},
    "erf": {"f32": (0, 1)},
    "erfc": {"f32": (62, 1), "half": (64, 1), "f64": (90, 1)},
    "erf_inv": {"f32": (37, 2), "half": (39, 2), "f64": (100, 2)},
    "lgamma": {"f32": (53, 4), "half": (55, 4)},
    "square": {"f32": (1, 0)},
    "is_inf": {"f32": (2, 0)}, "is_neg_inf": {"f32": (1, 0)}, "is_pos_inf": {"f32": (1, 0)},
    "next_after": {"f32": (24, 0)},
    "polygamma": {"f32": (260, 19), "half": (263, 19)},
    "zeta": {"f32": (121, 11), "half": (124, 11)},
    "top_k": {"f32": (0, 0)},
}
# Kept for callers of the first version: f32 costs of the chlo ops.
CHLO_EXPANSION = {name: costs["f32"] for name, costs in CHLO_COST.items()}
_REDUCER_KINDS = frozenset({"reduce", "reduce_window", "select_and_scatter", "scatter", "map",
                            "sort"})

_FLOAT_PRIORITY = ("f64", "f32", "bf16", "f16")
_HALF = frozenset({"f16", "bf16"})


def compute_dtype(types: Iterable[TensorType]) -> str:
    names = [t.dtype for t in types]
    for cand in _FLOAT_PRIORITY:
        if cand in names:
            return cand
    return names[0] if names else "f32"


def _conv_valid_positions(in_size: int, k_size: int, out_size: int, stride: int, pad_lo: int,
                          lhs_dil: int, rhs_dil: int) -> int:
    """Kernel taps that land on real (not padded, not dilated-hole) input, over all outputs."""
    count = 0
    for k in range(k_size):
        for o in range(out_size):
            undilated = o * stride - pad_lo + k * rhs_dil
            if undilated % lhs_dil:
                continue
            idx = undilated // lhs_dil
            if 0 <= idx < in_size:
                count += 1
    return count


def _conv_cost(op: Any, ins: list[TensorType], outs: list[TensorType]
               ) -> tuple[float, dict[str, Any]]:
    from jaxlib.mlir.dialects import stablehlo as sh

    dn = sh.ConvDimensionNumbers(op.attributes["dimension_numbers"])
    lhs, rhs, out = ins[0], ins[1], outs[0]
    n_sp = len(dn.input_spatial_dimensions)
    strides = ints(op_attr(op, "window_strides"), n_sp) or [1] * n_sp
    pad = ints(op_attr(op, "padding"), 2 * n_sp) or [0] * (2 * n_sp)
    lhs_dil = ints(op_attr(op, "lhs_dilation"), n_sp) or [1] * n_sp
    rhs_dil = ints(op_attr(op, "rhs_dilation"), n_sp) or [1] * n_sp
    fgc = int_attr(op, "feature_group_count", 1)
    bgc = int_attr(op, "batch_group_count", 1)
    valid = 1
    taps = 1
    for i in range(n_sp):
        in_size = lhs.shape[dn.input_spatial_dimensions[i]]
        k_size = rhs.shape[dn.kernel_spatial_dimensions[i]]
        o_size = out.shape[dn.output_spatial_dimensions[i]]
        taps *= k_size
        valid *= _conv_valid_positions(in_size, k_size, o_size, strides[i], pad[2 * i],
                                       lhs_dil[i], rhs_dil[i])
    batch = lhs.shape[dn.input_batch_dimension]
    cin = lhs.shape[dn.input_feature_dimension]
    cout = out.shape[dn.output_feature_dimension]
    fma = (cin // fgc) * cout * (batch // bgc) * valid
    out_spatial = math.prod(out.shape[d] for d in dn.output_spatial_dimensions)
    info = {"n": batch // bgc, "cin": cin // fgc, "cout": cout, "taps": taps,
            "out_spatial": out_spatial, "groups": fgc}
    return 2.0 * fma, info


def _dot_cost(op: Any, ins: list[TensorType], outs: list[TensorType]
              ) -> tuple[float, dict[str, Any]]:
    from jaxlib.mlir.dialects import stablehlo as sh

    dn = sh.DotDimensionNumbers(op.attributes["dot_dimension_numbers"])
    lhs, rhs = ins[0], ins[1]
    lhs_batch, lhs_contract = list(dn.lhs_batching_dimensions), list(dn.lhs_contracting_dimensions)
    rhs_batch, rhs_contract = list(dn.rhs_batching_dimensions), list(dn.rhs_contracting_dimensions)
    batch = math.prod(lhs.shape[d] for d in lhs_batch)
    k = math.prod(lhs.shape[d] for d in lhs_contract)
    lhs_free = set(range(len(lhs.shape))) - set(lhs_batch) - set(lhs_contract)
    rhs_free = set(range(len(rhs.shape))) - set(rhs_batch) - set(rhs_contract)
    m = math.prod(lhs.shape[d] for d in lhs_free)
    n = math.prod(rhs.shape[d] for d in rhs_free)
    flops = 2.0 * outs[0].num_elements * k
    return flops, {"batch": batch, "m": m, "n": n, "k": k}


def _chlo_cost(short: str, dtype: str) -> tuple[float, float, bool]:
    """(flops, transcendentals) per element of a chlo op, and whether the op is known."""
    costs = CHLO_COST.get(short)
    if costs is None:
        return 1.0, 0.0, False
    key = "half" if dtype in _HALF else dtype
    return (*costs.get(key, costs["f32"]), True)


def _region_scalar_flops(region_ops: Sequence[Any]) -> tuple[float, float, list[str]]:
    """Flops and transcendentals of one application of a scalar body (reducer, comparator)."""
    flops = 0.0
    trans = 0.0
    kinds: list[str] = []
    for inner in region_ops:
        name = inner.operation.name
        if name in ("stablehlo.return", "func.return"):
            continue
        short = name.split(".", 1)[1]
        kinds.append(short)
        n = 1
        results = inner.operation.results
        if results:
            try:
                n = max(1, tensor_type(results[0].type, name).num_elements)
            except UnsupportedProgramError:
                n = 1
        if short in TRANSCENDENTAL:
            trans += n
        elif short in ELEMENTWISE:
            flops += n
        elif name.startswith("chlo."):
            per_f, per_t, _ = _chlo_cost(short, "f32")
            flops += per_f * n
            trans += per_t * n
    return flops, trans, kinds


def op_cost(dialect: str, short: str, op: Any, ins: list[TensorType], outs: list[TensorType],
            notes: list[str]) -> tuple[float, float, int, int, dict[str, Any]]:
    """Flops, transcendentals, bytes read, bytes written and attrs of one execution of `op`;
    what it assumes is appended to `notes`."""
    out_elems = sum(t.num_elements for t in outs)
    read = sum(t.nbytes for t in ins)
    written = sum(t.nbytes for t in outs)
    attrs: dict[str, Any] = {}
    flops = trans = 0.0
    if dialect == "chlo":
        per_f, per_t, known = _chlo_cost(short, compute_dtype(ins or outs))
        if not known:
            notes.append(f"chlo.{short}: flops estimated as 1 per element")
        if short == "top_k":
            out_elems = 0
        flops, trans = per_f * out_elems, per_t * out_elems
    elif short in ELEMENTWISE:
        flops = out_elems
    elif short in TRANSCENDENTAL:
        trans = out_elems
    elif short == "dot_general":
        flops, attrs = _dot_cost(op, ins, outs)
    elif short == "dot":
        k = ins[0].shape[-1] if ins[0].shape else 1
        flops = 2.0 * out_elems * k
        attrs = {"batch": 1, "m": ins[0].shape[0] if len(ins[0].shape) == 2 else 1,
                 "n": ins[1].shape[-1] if len(ins[1].shape) == 2 else 1, "k": k}
    elif short == "convolution":
        flops, attrs = _conv_cost(op, ins, outs)
    elif short in _REDUCER_KINDS:
        flops, trans, read, written = _reducer_cost(short, op, ins, outs, attrs, read, written)
    elif short in ("rng", "rng_bit_generator"):
        trans = out_elems
    elif short == "triangular_solve":
        flops = 2.0 * ins[0].shape[-1] * ins[1].num_elements
    elif short == "cholesky":
        flops = float(ins[0].shape[-1] * ins[0].num_elements // 3)
    elif short == "fft":
        log_factors = math.prod(max(0, int(math.log2(d)))
                                for d in ints(op_attr(op, "fft_length")))
        flops = 8.0 * log_factors * ins[0].num_elements
    elif short == "custom_call":
        target = str_attr(op, "call_target_name") or "?"
        attrs["target"] = target
        notes.append(f"custom_call @{target}: opaque to tiermap; 0 flops assumed, bytes are its "
                     "operands and results")
    elif short in COLLECTIVES:
        pass  # bytes: operands read, results written; link bytes in attrs (collectives.py)
    elif short in MOVEMENT:
        if short in ("dynamic_slice", "slice", "real_dynamic_slice"):
            read = written + sum(t.nbytes for t in ins[1:])
        elif short == "gather":
            read = written + (ins[1].nbytes if len(ins) > 1 else 0)
        elif short == "dynamic_update_slice":
            read = ins[1].nbytes + sum(t.nbytes for t in ins[2:])
            written = ins[1].nbytes
        elif short in ("iota", "constant"):
            read = 0
        if short in FREE_KINDS:
            read = written = 0
    else:
        notes.append(f"stablehlo.{short}: no cost rule; counted as data movement")
    attrs["compute_dtype"] = compute_dtype(ins or outs)
    return float(flops), float(trans), read, written, attrs


def _reducer_cost(short: str, op: Any, ins: list[TensorType], outs: list[TensorType],
                  attrs: dict[str, Any], read: int, written: int
                  ) -> tuple[float, float, int, int]:
    region = op.regions[-1].blocks[0].operations if op.regions else []
    body_f, body_t, body_kinds = _region_scalar_flops(list(region))
    attrs["body"] = "+".join(body_kinds) or "-"
    flops = trans = 0.0
    apps = 0
    if short == "reduce":
        apps = ins[0].num_elements - outs[0].num_elements
    elif short == "reduce_window":
        window = math.prod(ints(op_attr(op, "window_dimensions")) or [1])
        apps = outs[0].num_elements * (window - 1)
        attrs["window"] = window
    elif short == "select_and_scatter":
        window = math.prod(ints(op_attr(op, "window_dimensions")) or [1])
        sel_f, sel_t, _ = _region_scalar_flops(list(op.regions[0].blocks[0].operations))
        src = ins[1].num_elements
        flops = src * (window - 1) * sel_f + src * body_f
        trans = src * (window - 1) * sel_t + src * body_t
        attrs["window"] = window
    elif short == "scatter":
        n_ops = (len(ins) - 1) // 2
        updates = ins[n_ops + 1:]
        apps = updates[0].num_elements
        read = sum(t.nbytes for t in updates) * 2 + ins[n_ops].nbytes
        written = sum(t.nbytes for t in updates)
    elif short == "map":
        apps = outs[0].num_elements
    else:  # sort: comparison based n·⌈log2 n⌉ over the first operand
        elems = ins[0].num_elements
        flops = float(elems * (math.ceil(math.log2(elems)) if elems > 1 else 0))
        attrs["body"] = "compare"
    flops += apps * body_f
    trans += apps * body_t
    return flops, trans, read, written
