"""StableHLO → tiermap IR. The only module that touches MLIR objects (with `annotate`).

`lower(fn, *args)` traces a JAX function with
`jax.jit(fn).trace(...).lower(lowering_platforms=...)`; `lower_mlir(text_or_path)` takes a
StableHLO module from any producer. Both walk the module once with jaxlib's MLIR bindings:

- `func.call`s (and `stablehlo.composite`s) are inlined: every call site gets its own ops, whose
  `mlir_path` is the call's path followed by the callee op's index.
- Reducers (`reduce`, `reduce_window`, `scatter`, `select_and_scatter`, `map`, `sort`) are
  summarised: their scalar body is costed per application, not kept as ops.
- `while` and `case` bodies are kept as nested ops. A `while` costs its cond + body ops times its
  trip count, static where the loop has the `i = c0; i < c1; i += c2` shape that `lax.scan` and
  `fori_loop` emit, else assumed 1 and recorded in `Program.assumptions`. A `case` costs its most
  expensive branch, as XLA does; its `body` holds that branch.
- Values a region reads from outside (implicit captures) are appended to the op's `inputs`, so
  liveness sees them; `attrs["num_operands"]` says how many inputs are real operands.

FLOPs follow XLA's HloCostAnalysis run on the HLO that XLA converts the module into, so that
`Program.flops_one_trip` agrees with `jax.jit(fn).lower(*args).cost_analysis()["flops"]`: one flop
per element of an elementwise op (transcendentals apart), 2·out·k for a dot, 2 per valid kernel
tap for a convolution, (in − out)·body for a reduce, out·(window − 1)·body for a reduce_window,
n·⌈log2 n⌉ for a sort, measured per-element costs for the chlo ops XLA expands (`CHLO_COST`).
That conversion also folds some ops and drops dead ones; the frontend does the same so the counts
match and the schedule holds only ops that run:

- an op whose operands are all constants becomes a `stablehlo.constant` (no inputs,
  `attrs["folded_from"]` names the original kind), except the kinds in `NOT_CONSTANT_FOLDED`;
  so does an iota along a dimension of size 1;
- identities vanish and their result is the operand itself: `x + 0`, `x - 0`, `x · 1`,
  `x or false`, `x xor false`, `x and true`, `select` with a constant predicate or equal branches,
  a `convert` to the same type; absorbing constants fold (`x and false`, `x or true`, integer
  `x · 0`);
- ops none of whose results are used (and that have no side effect) are dropped.

Folds never look across a function boundary, as in XLA where each callee is a computation of its
own: inside a callee its parameters are unknown values, and call results are unknown to the
caller. Shardy sharding annotations (which XLA turns into custom calls) pass values through
unchanged but also hide them from folds; a `sdy.manual_computation` on one device is inlined.

Bytes are each op's compulsory traffic when run alone: what it must read of its operands and write
of its results (a slice or gather reads what it returns, a reshape is free).
"""

from __future__ import annotations

import functools
import gc
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tiermap.errors import UnsupportedProgramError, UserCodeError
from tiermap.ir.program import DTYPE_BITS, Op, Program, TensorType, Value

# --- op classes (XLA HloCostAnalysis conventions) -------------------------------------------

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
})
FREE_KINDS = frozenset({"reshape", "get_tuple_element", "tuple", "optimization_barrier",
                        "after_all", "create_token", "partition_id", "replica_id"})

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

# Elementwise kinds that XLA's StableHLO → HLO conversion does not fold on constant operands
# (measured); every other elementwise, transcendental and movement op on constants is folded.
NOT_CONSTANT_FOLDED = frozenset({
    "cbrt", "ceil", "floor", "exponential_minus_one", "log_plus_one", "is_finite", "atan2",
    "power", "shift_left", "shift_right_logical", "shift_right_arithmetic", "popcnt",
    "count_leading_zeros", "reduce_precision", "bitcast_convert", "real", "imag", "complex",
    "iota", "dynamic_slice", "dynamic_update_slice", "gather", "copy",
})
_FOLDABLE_MOVEMENT = frozenset({
    "broadcast_in_dim", "broadcast", "reshape", "transpose", "slice", "reverse", "concatenate",
    "pad",
})
# Ops kept even when nothing reads their results.
_SIDE_EFFECT_KINDS = frozenset({
    "send", "recv", "infeed", "outfeed", "after_all", "create_token", "rng_bit_generator",
})
# Shardy ops that only annotate their operand; the frontend passes the operand through.
_SDY_PASS_THROUGH = frozenset({
    "sdy.sharding_constraint", "sdy.reshard", "sdy.propagation_barrier",
})
_REDUCER_KINDS = frozenset({"reduce", "reduce_window", "select_and_scatter", "scatter", "map",
                            "sort"})

_FLOAT_PRIORITY = ("f64", "f32", "bf16", "f16")
_HALF = frozenset({"f16", "bf16"})
# A NameLoc's name: `loc("name"(child))` or `loc("name")`, not a file location `"file":12:3`.
_LOC_NAME = re.compile(r'loc\("([^"]*)"(?!:\d)')
_LOC_PY = re.compile(r'"([^"]+\.py)":(\d+)')
_LOC_ANY = re.compile(r'"([^"]*)":(\d+):\d+')
# Frames in these paths are library code; an op's location names the innermost frame outside them.
_LIBRARY_PATHS = ("site-packages", "dist-packages", "/jax/_src/", "<frozen")
_NONSPLAT = object()  # constant value whose elements differ (or are unknown)


def _dtype_name(element_type: Any) -> str:
    s = str(element_type)
    if s.startswith("complex<"):
        inner = s[len("complex<"):-1]
        return "c64" if inner == "f32" else "c128"
    if s.startswith("!stablehlo.token"):
        return "token"
    return s


def _format_location(text: str) -> str:
    """`name @ file.py:line` from a printed MLIR location; `line N` for text without a file."""
    name = _LOC_NAME.search(text)
    where = _LOC_PY.search(text) or _LOC_ANY.search(text)
    parts = []
    if name:
        parts.append(name.group(1))
    if where:
        source = where.group(1)
        if source in ("-", ""):
            parts.append(f"line {where.group(2)}")
        else:
            parts.append(f"{os.path.basename(source)}:{where.group(2)}")
    return " @ ".join(parts)


def _short_location(loc: Any) -> str:
    """`name @ file.py:line` of an MLIR location: the op's name and its innermost frame."""
    return _format_location(str(loc))


def _tensor_type(mlir_type: Any, where: str) -> TensorType:
    """The IR type of an MLIR type; raises UnsupportedProgramError naming `where` if not static."""
    from jaxlib.mlir import ir

    s = str(mlir_type)
    if s.startswith("!stablehlo.token"):
        return TensorType((), "token")
    rt: Any
    if isinstance(mlir_type, ir.RankedTensorType):
        rt = mlir_type
    else:
        try:
            rt = ir.RankedTensorType(mlir_type)
        except (ValueError, TypeError):
            rt = None
    if rt is None:
        raise UnsupportedProgramError(
            f"{where}: type {s} is not a ranked tensor; tiermap needs static, ranked shapes. "
            "Fix: give the function concrete shapes (jax.ShapeDtypeStruct with integer dims)."
        )
    if not rt.has_static_shape:
        raise UnsupportedProgramError(
            f"{where}: dynamic shape {s}; tiermap plans static shapes only. "
            "Fix: trace with concrete shapes (no jax.export symbolic dimensions)."
        )
    dtype = _dtype_name(rt.element_type)
    if dtype not in DTYPE_BITS:
        raise UnsupportedProgramError(
            f"{where}: element type {dtype} is not supported; "
            f"supported: {', '.join(sorted(DTYPE_BITS))}")
    return TensorType(tuple(int(d) for d in rt.shape), dtype)


def _attr(op: Any, name: str) -> Any | None:
    attrs = op.attributes
    return attrs[name] if name in attrs else None


def _ints(attr: Any, length: int | None = None) -> list[int]:
    """Integer list from a DenseI64ArrayAttr, DenseIntElementsAttr (splats expanded) or ArrayAttr.

    `length` pads a splat or empty attribute to that many values.
    """
    from jaxlib.mlir import ir

    if attr is None:
        return []
    if isinstance(attr, ir.DenseI64ArrayAttr | ir.DenseI32ArrayAttr):
        return [int(x) for x in attr]
    if isinstance(attr, ir.DenseIntElementsAttr):
        if attr.is_splat and length is not None:
            return [int(ir.IntegerAttr(attr.get_splat_value()).value)] * length
        return [int(attr[i]) for i in range(len(attr))]
    if isinstance(attr, ir.IntegerAttr):
        return [int(attr.value)]
    if isinstance(attr, ir.ArrayAttr):
        return [int(ir.IntegerAttr(a).value) for a in attr]
    text = str(attr)
    inner = text
    if text.startswith("array<"):
        inner = text.split(":", 1)[1].rstrip(">") if ":" in text else ""
    elif text.startswith("dense<"):
        inner = text[len("dense<"): text.rindex(">")]
    return [int(x) for x in re.findall(r"-?\d+", inner.split(":")[0])]


def _int_attr(op: Any, name: str, default: int) -> int:
    from jaxlib.mlir import ir

    attr = _attr(op, name)
    if attr is None:
        return default
    if isinstance(attr, ir.IntegerAttr):
        return int(attr.value)
    return int(str(attr).split(":")[0])


def _str_attr(op: Any, name: str) -> str:
    from jaxlib.mlir import ir

    attr = _attr(op, name)
    if attr is None:
        return ""
    if isinstance(attr, ir.StringAttr):
        return str(attr.value)
    if isinstance(attr, ir.FlatSymbolRefAttr):
        return str(attr.value)
    return str(attr).strip('"').lstrip("@")


def _compute_dtype(types: Iterable[TensorType]) -> str:
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
    strides = _ints(_attr(op, "window_strides"), n_sp) or [1] * n_sp
    pad = _ints(_attr(op, "padding"), 2 * n_sp) or [0] * (2 * n_sp)
    lhs_dil = _ints(_attr(op, "lhs_dilation"), n_sp) or [1] * n_sp
    rhs_dil = _ints(_attr(op, "rhs_dilation"), n_sp) or [1] * n_sp
    fgc = _int_attr(op, "feature_group_count", 1)
    bgc = _int_attr(op, "batch_group_count", 1)
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


# --- the walk ---------------------------------------------------------------------------------


@dataclass
class _Node:
    """An op while the module is walked; becomes an `Op` once dead ops are dropped."""

    kind: str
    path: tuple[int, ...]
    ins: list[int]
    outs: list[int]
    flops: float = 0.0
    trans: float = 0.0
    read: int = 0
    written: int = 0
    attrs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    loc: Any = None
    side_effect: bool = False
    # Control flow: the walked regions, each (arg keys, nodes, returned keys).
    regions: list[tuple[list[int], list[_Node], list[int]]] = field(default_factory=list)
    trips: int = 1


class _Walker:
    """Walks a module's entry function into `_Node`s: inlines calls, folds, nests bodies."""

    def __init__(self, funcs: dict[str, Any]) -> None:
        self.funcs = funcs
        self.types: dict[int, TensorType] = {}  # value key -> type
        # Constants of the function being walked (regions see their parent's): value key ->
        # splat python value or _NONSPLAT.
        self.consts: dict[int, Any] = {}
        self.next_key = 0
        # Alias key -> canonical key: the same IR value seen as a callee parameter or a call
        # result. Folds look at keys as they are; ops and the IR use canonical keys.
        self.alias: dict[int, int] = {}
        self.type_cache: dict[Any, TensorType] = {}
        self.call_stack: list[str] = []

    # --- values -----------------------------------------------------------------------------

    def new_key(self, ttype: TensorType) -> int:
        key = self.next_key
        self.next_key += 1
        self.types[key] = ttype
        return key

    def alias_of(self, key: int) -> int:
        """A new key for the same IR value as `key` (see `alias`)."""
        new = self.next_key
        self.next_key += 1
        self.types[new] = self.types[key]
        self.alias[new] = self.alias.get(key, key)
        return new

    def ttype(self, mlir_type: Any, where: Callable[[], str]) -> TensorType:
        cached = self.type_cache.get(mlir_type)
        if cached is None:
            cached = _tensor_type(mlir_type, where())
            self.type_cache[mlir_type] = cached
        return cached

    # --- blocks -----------------------------------------------------------------------------

    def walk_block(self, block: Any, env: dict[Any, int], path: tuple[int, ...],
                   nodes: list[_Node]) -> list[int]:
        """Append the nodes of `block` to `nodes`; returns the keys its terminator returns."""
        returned: list[int] = []
        for index, wrapped in enumerate(block.operations):
            op = wrapped.operation
            name = op.name
            if name == "func.return" or name == "stablehlo.return" or name == "sdy.return":
                alias = self.alias
                returned = [alias.get(env[v], env[v]) for v in op.operands]
                continue
            if name == "func.call":
                self._inline(op, _str_attr(op, "callee"), env, path + (index,), nodes)
                continue
            if name == "stablehlo.composite":
                self._inline(op, _str_attr(op, "decomposition"), env, path + (index,), nodes)
                continue
            if name.startswith("sdy."):
                self._sharding_op(op, name, env, path + (index,), nodes)
                continue
            self._op(op, name, env, path + (index,), nodes)
        return returned

    def _where(self, op: Any) -> str:
        return f"{op.name} at {_short_location(op.location) or 'unknown location'}"

    def _inline(self, op: Any, callee: str, env: dict[Any, int], path: tuple[int, ...],
                nodes: list[_Node]) -> None:
        fn = self.funcs.get(callee)
        if fn is None:
            raise UnsupportedProgramError(
                f"{self._where(op)}: calls @{callee}, which the module does not define. "
                "Fix: include the callee in the module.")
        if callee in self.call_stack:
            chain = " -> ".join(self.call_stack + [callee])
            raise UnsupportedProgramError(
                f"{self._where(op)}: recursive call chain {chain}; tiermap needs a call graph "
                "without cycles.")
        self.call_stack.append(callee)
        inner_block = fn.regions[0].blocks[0]
        # XLA keeps each callee a computation of its own: its parameters and the call's results
        # are values of their own (no constant folds or identities across the call), so they
        # get alias keys, which stand for the same IR value.
        inner_env = {arg: self.alias_of(env[v]) for arg, v in zip(inner_block.arguments,
                                                                  op.operands, strict=True)}
        caller_consts, self.consts = self.consts, {}
        results = self.walk_block(inner_block, inner_env, path, nodes)
        self.consts = caller_consts
        self.call_stack.pop()
        for res, key in zip(op.results, results, strict=True):
            env[res] = self.alias_of(key)

    def _sharding_op(self, op: Any, name: str, env: dict[Any, int], path: tuple[int, ...],
                     nodes: list[_Node]) -> None:
        """Shardy ops: sharding annotations pass their operand through; a manual computation
        (shard_map) is inlined, its body standing for the whole program on one device."""
        if name in _SDY_PASS_THROUGH:
            # XLA turns these into custom calls, which no fold looks through: an alias key.
            for res, operand in zip(op.results, op.operands, strict=False):
                env[res] = self.alias_of(env[operand])
            return
        if name == "sdy.manual_computation":
            block = op.regions[0].blocks[0]
            inner_env = dict(env)
            for arg, operand in zip(block.arguments, op.operands, strict=True):
                if self.types[env[operand]].shape != tuple(arg.type.shape):
                    raise UnsupportedProgramError(
                        f"{self._where(op)}: a manual computation over more than one device; "
                        "tiermap plans single-device programs. Fix: lower without shard_map.")
                inner_env[arg] = env[operand]
            results = self.walk_block(block, inner_env, path + (0,), nodes)
            for res, key in zip(op.results, results, strict=True):
                env[res] = key
            return
        if not op.results:  # sdy.sharding_group and other pure annotations
            return
        raise UnsupportedProgramError(
            f"{self._where(op)}: sharding op '{name}' moves data between devices; tiermap plans "
            "single-device programs. Fix: lower for one device (no mesh).")

    def _op(self, op: Any, name: str, env: dict[Any, int], path: tuple[int, ...],
            nodes: list[_Node]) -> None:
        dialect, short = name.split(".", 1)
        if dialect not in ("stablehlo", "chlo", "mhlo"):
            raise UnsupportedProgramError(
                f"{self._where(op)}: op '{name}' of dialect '{dialect}' is not StableHLO. "
                "Fix: lower with jax (which emits StableHLO) or convert the module first."
            )
        kind = "stablehlo." + short if dialect == "mhlo" else name
        try:
            ins = [env[v] for v in op.operands]
        except KeyError:
            raise UnsupportedProgramError(
                f"{self._where(op)}: an operand is defined outside its scope") from None
        types = self.types
        in_types = [types[k] for k in ins]
        out_types = [self.ttype(r.type, lambda: self._where(op)) for r in op.results]

        # (1) folds XLA's conversion applies: aliases and constants.
        consts = self.consts
        if short == "constant":
            key = self.new_key(out_types[0])
            consts[key] = _splat_value(_attr(op, "value"))
            env[op.results[0]] = key
            nodes.append(_Node(kind, path, [], [key], written=out_types[0].nbytes,
                               attrs={"compute_dtype": out_types[0].dtype}, loc=op.location))
            return
        if short == "iota" and out_types[0].shape[_int_attr(op, "iota_dimension", 0)] == 1:
            # An iota along a dimension of size 1 is all zeros; XLA folds it to a constant.
            key = self.new_key(out_types[0])
            consts[key] = 0.0 if out_types[0].dtype.startswith(("f", "bf")) else 0
            env[op.results[0]] = key
            nodes.append(_Node("stablehlo.constant", path, [], [key],
                               written=out_types[0].nbytes,
                               attrs={"compute_dtype": out_types[0].dtype,
                                      "folded_from": kind}, loc=op.location))
            return
        if ins and len(out_types) == 1 and (short in ELEMENTWISE or short in TRANSCENDENTAL
                                            or short in _FOLDABLE_MOVEMENT
                                            or dialect == "chlo"):
            folded = _fold(short, ins, in_types, out_types[0], consts, op)
            if folded is not None:
                how, what = folded
                if how == "alias":
                    env[op.results[0]] = what
                    return
                key = self.new_key(out_types[0])
                consts[key] = what
                env[op.results[0]] = key
                nodes.append(_Node("stablehlo.constant", path, [], [key],
                                   written=out_types[0].nbytes,
                                   attrs={"compute_dtype": out_types[0].dtype,
                                          "folded_from": kind}, loc=op.location))
                return

        # (2) cost of one execution, over canonical keys (aliases resolved).
        alias = self.alias
        ins = [alias.get(k, k) for k in ins]
        if short == "while" or short == "case" or short == "if":
            node = self._control(op, kind, short, env, ins, in_types, out_types, path)
        else:
            node = _Node(kind, path, ins, [], loc=op.location)
            _cost(node, dialect, short, op, in_types, out_types)
            if short == "custom_call":
                node.side_effect = _is_true(_attr(op, "has_side_effect"))
            elif short in _SIDE_EFFECT_KINDS:
                node.side_effect = True
        outs = [self.new_key(t) for t in out_types]
        node.outs = outs
        for res, key in zip(op.results, outs, strict=True):
            env[res] = key
        nodes.append(node)

    # --- control flow -----------------------------------------------------------------------

    def _control(self, op: Any, kind: str, short: str, env: dict[Any, int], ins: list[int],
                 in_types: list[TensorType], out_types: list[TensorType],
                 path: tuple[int, ...]) -> _Node:
        node = _Node(kind, path, list(ins), [], loc=op.location,
                     read=sum(t.nbytes for t in in_types),
                     written=sum(t.nbytes for t in out_types),
                     attrs={"compute_dtype": _compute_dtype(in_types or out_types),
                            "num_operands": len(ins)})
        region_envs = []
        for r_index, region in enumerate(op.regions):
            block = region.blocks[0]
            inner_env = dict(env)
            args = []
            for arg in block.arguments:
                key = self.new_key(self.ttype(arg.type, lambda: self._where(op)))
                inner_env[arg] = key
                args.append(key)
            body: list[_Node] = []
            returned = self.walk_block(block, inner_env, path + (r_index,), body)
            node.regions.append((args, body, returned))
            region_envs.append(inner_env)
        if short == "while":
            trips = _static_trip_count(op, env, region_envs, self.consts)
            if trips is None:
                node.trips = 1
                node.notes.append("while loop bound is not static; assumed 1 trip")
            else:
                node.trips = trips
        node.attrs["regions"] = len(op.regions)
        # Implicit captures: keys used inside the regions but defined outside them.
        captured = _captured(node.regions)
        node.ins.extend(k for k in captured if k not in node.ins)
        return node


def _is_true(attr: Any) -> bool:
    return attr is not None and str(attr).lower() in ("true", "1")


def _splat_value(attr: Any) -> Any:
    """The python value of a splat constant, else _NONSPLAT."""
    from jaxlib.mlir import ir

    if not isinstance(attr, ir.DenseElementsAttr) or not attr.is_splat:
        return _NONSPLAT
    value = attr.get_splat_value()
    if isinstance(value, ir.FloatAttr):
        return float(value.value)
    if isinstance(value, ir.BoolAttr):
        return bool(value.value)
    if isinstance(value, ir.IntegerAttr):
        return int(value.value)
    return _NONSPLAT


def _is_zero(v: Any) -> bool:
    return v is not _NONSPLAT and not isinstance(v, bool) and v == 0 or v is False


def _is_one(v: Any) -> bool:
    return v is not _NONSPLAT and not isinstance(v, bool) and v == 1


def _is_all_ones(v: Any, dtype: str) -> bool:
    if v is True:
        return True
    if v is _NONSPLAT or isinstance(v, bool) or not isinstance(v, int):
        return False
    bits = DTYPE_BITS.get(dtype, 32)
    return v == -1 or v == (1 << bits) - 1


def _fold(short: str, ins: list[int], in_types: list[TensorType], out: TensorType,
          consts: dict[int, Any], op: Any) -> tuple[str, Any] | None:
    """("alias", key) or ("const", value) when XLA's StableHLO → HLO conversion folds the op."""
    vals = [consts.get(k, None) for k in ins]
    known = [v is not None for v in vals]
    if all(known):
        if short in NOT_CONSTANT_FOLDED:
            return None
        return "const", _eval_splat(short, vals, out.dtype, op)
    if short == "convert" and in_types[0] == out:
        return "alias", ins[0]
    if short == "select":
        pred = vals[0]
        if pred is not None and pred is not _NONSPLAT:
            return "alias", ins[1] if pred else ins[2]
        if ins[1] == ins[2]:
            return "alias", ins[1]
        return None
    if len(ins) != 2 or not any(known):
        return None
    lhs, rhs = vals
    if short == "add" or short == "or" or short == "xor":
        if short == "or" and (_is_all_ones(lhs, out.dtype) or _is_all_ones(rhs, out.dtype)):
            return "const", True if out.dtype == "i1" else -1
        if lhs is not None and _is_zero(lhs) and in_types[1] == out:
            return "alias", ins[1]
        if rhs is not None and _is_zero(rhs) and in_types[0] == out:
            return "alias", ins[0]
    elif short == "subtract":
        if rhs is not None and _is_zero(rhs) and in_types[0] == out:
            return "alias", ins[0]
    elif short == "multiply":
        is_int = out.dtype.startswith(("i", "ui"))
        if is_int and ((lhs is not None and _is_zero(lhs)) or (rhs is not None and _is_zero(rhs))):
            return "const", 0
        if lhs is not None and _is_one(lhs) and in_types[1] == out:
            return "alias", ins[1]
        if rhs is not None and _is_one(rhs) and in_types[0] == out:
            return "alias", ins[0]
    elif short == "and":
        if (lhs is not None and _is_zero(lhs)) or (rhs is not None and _is_zero(rhs)):
            return "const", False if out.dtype == "i1" else 0
        if lhs is not None and _is_all_ones(lhs, out.dtype) and in_types[1] == out:
            return "alias", ins[1]
        if rhs is not None and _is_all_ones(rhs, out.dtype) and in_types[0] == out:
            return "alias", ins[0]
    return None


def _eval_splat(short: str, vals: list[Any], dtype: str, op: Any) -> Any:
    """The folded value when every operand is a splat constant; _NONSPLAT when not computed."""
    if any(v is _NONSPLAT for v in vals):
        return _NONSPLAT
    is_float = dtype.startswith(("f", "bf"))
    try:
        if short in ("broadcast_in_dim", "broadcast", "reshape", "transpose", "slice",
                     "reverse"):
            return vals[0]
        if short in ("concatenate", "pad"):
            return vals[0] if all(v == vals[0] for v in vals) else _NONSPLAT
        if short == "convert":
            v = vals[0]
            if dtype == "i1":
                return bool(v)
            return float(v) if is_float else int(v)
        if short == "negate":
            return -vals[0]
        if short == "abs":
            return abs(vals[0])
        if short == "sign":
            v = vals[0]
            return (v > 0) - (v < 0)
        if short == "not":
            return not vals[0] if dtype == "i1" else ~int(vals[0])
        if short == "select":
            return vals[1] if vals[0] else vals[2]
        if len(vals) != 2:
            return _NONSPLAT
        a, b = vals
        if short == "add":
            return a + b
        if short == "subtract":
            return a - b
        if short == "multiply":
            return a * b
        if short == "divide":
            return a / b if is_float else int(a / b)
        if short == "maximum":
            return max(a, b)
        if short == "minimum":
            return min(a, b)
        if short == "and":
            return a and b if dtype == "i1" else int(a) & int(b)
        if short == "or":
            return a or b if dtype == "i1" else int(a) | int(b)
        if short == "xor":
            return bool(a) != bool(b) if dtype == "i1" else int(a) ^ int(b)
        if short == "compare":
            direction = str(_attr(op, "comparison_direction"))
            for key, fn in (("EQ", a == b), ("NE", a != b), ("LT", a < b), ("LE", a <= b),
                            ("GT", a > b), ("GE", a >= b)):
                if key in direction:
                    return fn
    except (ArithmeticError, TypeError, ValueError):
        return _NONSPLAT
    return _NONSPLAT


def _captured(regions: list[tuple[list[int], list[_Node], list[int]]]) -> list[int]:
    defined: set[int] = set()
    used: list[int] = []
    for args, body, returned in regions:
        defined.update(args)
        for node in body:
            used.extend(node.ins)
            defined.update(node.outs)
        used.extend(returned)
    seen: set[int] = set()
    out = []
    for k in used:
        if k not in defined and k not in seen:
            seen.add(k)
            out.append(k)
    return out


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
                n = max(1, _tensor_type(results[0].type, name).num_elements)
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


def _cost(node: _Node, dialect: str, short: str, op: Any, ins: list[TensorType],
          outs: list[TensorType]) -> None:
    """Fill flops, transcendentals, bytes, attrs and notes of one execution of `op`."""
    out_elems = sum(t.num_elements for t in outs)
    read = sum(t.nbytes for t in ins)
    written = sum(t.nbytes for t in outs)
    attrs: dict[str, Any] = {}
    notes = node.notes
    flops = trans = 0.0
    if dialect == "chlo":
        per_f, per_t, known = _chlo_cost(short, _compute_dtype(ins or outs))
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
        log_factors = math.prod(max(0, int(math.log2(d))) for d in _ints(_attr(op,
                                                                            "fft_length")))
        flops = 8.0 * log_factors * ins[0].num_elements
    elif short == "custom_call":
        target = _str_attr(op, "call_target_name") or "?"
        attrs["target"] = target
        notes.append(f"custom_call @{target}: opaque to tiermap; 0 flops assumed, bytes are its "
                     "operands and results")
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
    attrs["compute_dtype"] = _compute_dtype(ins or outs)
    node.flops, node.trans, node.read, node.written = float(flops), float(trans), read, written
    node.attrs = attrs


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
        window = math.prod(_ints(_attr(op, "window_dimensions")) or [1])
        apps = outs[0].num_elements * (window - 1)
        attrs["window"] = window
    elif short == "select_and_scatter":
        window = math.prod(_ints(_attr(op, "window_dimensions")) or [1])
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


def _static_trip_count(op: Any, env: dict[Any, int], region_envs: list[dict[Any, int]],
                       consts: dict[int, Any]) -> int | None:
    """Trip count of `i = c0; while i < c1: i += c2`, the shape lax.scan/fori_loop emit."""
    cond_block = op.regions[0].blocks[0]
    body_block = op.regions[1].blocks[0]
    cond_env, body_env = region_envs

    def const_int(env_: dict[Any, int], v: Any) -> int | None:
        key = env_.get(v)
        value = consts.get(key) if key is not None else None
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value

    ret = list(cond_block.operations)[-1].operation
    if not ret.operands:
        return None
    cmp_op = ret.operands[0].owner
    if getattr(cmp_op, "name", "") != "stablehlo.compare":
        return None
    direction = str(_attr(cmp_op, "comparison_direction"))
    lhs, rhs = cmp_op.operands[0], cmp_op.operands[1]
    cond_args = list(cond_block.arguments)
    body_args = list(body_block.arguments)
    body_ret = list(body_block.operations)[-1].operation
    idx = next((i for i, a in enumerate(cond_args) if a == lhs), None)
    if idx is None:
        return None
    limit = const_int(cond_env, rhs)
    if limit is None:  # a loop-carried bound that the body passes through unchanged
        j = next((i for i, a in enumerate(cond_args) if a == rhs), None)
        if j is None or body_ret.operands[j] != body_args[j]:
            return None
        limit = const_int(env, op.operands[j])
    init = const_int(env, op.operands[idx])
    if limit is None or init is None:
        return None
    nxt = body_ret.operands[idx].owner
    if getattr(nxt, "name", "") != "stablehlo.add":
        return None
    a, c = nxt.operands[0], nxt.operands[1]
    if a != body_args[idx]:
        a, c = c, a
    stride = const_int(body_env, c)
    if a != body_args[idx] or stride is None or stride <= 0:
        return None
    if "LT" in direction:
        return max(0, -(-(limit - init) // stride))
    if "LE" in direction:
        return max(0, (limit - init) // stride + 1)
    if "NE" in direction and (limit - init) % stride == 0:
        return max(0, (limit - init) // stride)
    return None


# --- from nodes to the immutable IR ------------------------------------------------------------


class _Finisher:
    """Drops dead nodes, numbers steps and values, and builds `Op`s and `Value`s."""

    def __init__(self, walker: _Walker) -> None:
        self.walker = walker
        self.ids: dict[int, str] = {}
        self.values: dict[str, Value] = {}
        self.body_values: dict[str, Value] = {}
        self.assumptions: list[str] = []
        self.loc_cache: dict[Any, str] = {}
        self.frame_cache: dict[Any, tuple[str, str]] = {}
        from jaxlib.mlir import ir

        self.ir = ir
        self.next_value = 0
        self.dropped = 0

    def value(self, key: int, producer_step: int, top: bool) -> str:
        vid = f"t{self.next_value}"
        self.next_value += 1
        self.ids[key] = vid
        table = self.values if top else self.body_values
        table[vid] = Value(vid, self.walker.types[key], producer_step)
        return vid

    def location(self, loc: Any) -> str:
        """`name @ file.py:line`: the op's name and its innermost frame in the user's code."""
        if loc is None:
            return ""
        attr = loc.attr
        text = self.loc_cache.get(attr)
        if text is None:
            text = self._format_location(loc)
            self.loc_cache[attr] = text
        return text

    def _format_location(self, loc: Any) -> str:
        name = ""
        if isinstance(loc, self.ir.NameLoc):
            name = str(loc.name_str)
            loc = loc.child_loc
        user, first = self._frames(loc)
        frame = user or first
        return " @ ".join(part for part in (name, frame) if part)

    def _frames(self, loc: Any) -> tuple[str, str]:
        """(innermost frame outside libraries, innermost frame) of a location, memoised."""
        ir = self.ir
        attr = loc.attr
        cached = self.frame_cache.get(attr)
        if cached is not None:
            return cached
        result = ("", "")
        if isinstance(loc, ir.FileLineColLoc):
            source = str(loc.filename)
            line = int(loc.start_line)
            frame = (f"line {line}" if source in ("-", "")
                     else f"{os.path.basename(source)}:{line}")
            is_library = any(mark in source for mark in _LIBRARY_PATHS)
            result = ("" if is_library else frame, frame)
        elif isinstance(loc, ir.CallSiteLoc):
            callee, caller = self._frames(loc.callee), self._frames(loc.caller)
            result = (callee[0] or caller[0], callee[1] or caller[1])
        elif isinstance(loc, ir.NameLoc):
            result = self._frames(loc.child_loc)
        elif isinstance(loc, ir.FusedLoc):
            for part in loc.locations:
                user, first = self._frames(part)
                result = (result[0] or user, result[1] or first)
        self.frame_cache[attr] = result
        return result

    def finish_block(self, nodes: list[_Node], roots: Iterable[int], top: bool,
                     prefix: str) -> list[Op]:
        live = set(roots)
        kept: list[_Node] = []
        for node in reversed(nodes):
            if node.side_effect or any(k in live for k in node.outs):
                kept.append(node)
                live.update(node.ins)
            else:
                self.dropped += 1
        kept.reverse()
        ops = []
        for step, node in enumerate(kept):
            op_id = f"{prefix}{step}"
            body: tuple[Op, ...] = ()
            flops, trans, trips = node.flops, node.trans, 1
            if node.regions:
                body, flops, trans, trips = self.finish_control(node, op_id)
            outs = tuple(self.value(k, step, top) for k in node.outs)
            op = Op(
                id=op_id, kind=node.kind, step=step,
                inputs=tuple(self.ids[k] for k in node.ins), outputs=outs,
                flops=float(flops), transcendentals=float(trans),
                bytes_read=int(node.read), bytes_written=int(node.written), trip_count=trips,
                attrs=node.attrs, body=body, location=self.location(node.loc),
                mlir_path=node.path, notes=tuple(node.notes),
            )
            ops.append(op)
            for note in node.notes:
                self.assumptions.append(f"{op_id}: {note}")
        return ops

    def finish_control(self, node: _Node, op_id: str
                       ) -> tuple[tuple[Op, ...], float, float, int]:
        short = node.kind.split(".", 1)[1]
        bodies: list[list[Op]] = []
        arg_ids: list[tuple[str, ...]] = []
        for r_index, (args, body, returned) in enumerate(node.regions):
            arg_ids.append(tuple(self.value(k, -1, False) for k in args))
            bodies.append(self.finish_block(body, returned, False, f"{op_id}.r{r_index}."))
        if short == "while":
            node.attrs["region_args"] = tuple(arg_ids)
            all_ops = [o for ops in bodies for o in ops]
            per_trip_f = sum(o.flops for o in all_ops)
            per_trip_t = sum(o.transcendentals for o in all_ops)
            return (tuple(all_ops), per_trip_f * node.trips, per_trip_t * node.trips,
                    node.trips)
        # case: the most expensive branch, as XLA does (each property maximised apart).
        flops = max((sum(o.flops for o in ops) for ops in bodies), default=0.0)
        trans = max((sum(o.transcendentals for o in ops) for ops in bodies), default=0.0)
        best = max(range(len(bodies)), key=lambda i: sum(o.flops for o in bodies[i]),
                   default=0)
        node.attrs["branch"] = best
        if len(bodies) > 1:
            node.notes.append(f"{short}: cost of the most expensive of {len(bodies)} branches "
                              f"(branch {best})")
        return tuple(bodies[best]) if bodies else (), flops, trans, 1


def _entry_function(module: Any) -> tuple[Any, dict[str, Any]]:
    funcs: dict[str, Any] = {}
    for wrapped in module.body.operations:
        op = wrapped.operation
        if op.name == "func.func":
            funcs[_str_attr(op, "sym_name")] = op
    if "main" in funcs:
        return funcs["main"], funcs
    public = [f for f in funcs.values() if _str_attr(f, "sym_visibility") != "private"]
    if not public:
        raise UnsupportedProgramError(
            "module has no public func.func (expected @main); fix: export the entry point")
    return public[0], funcs


def program_from_module(module: Any, name: str | None = None, platform: str = "cpu") -> Program:
    """Build the IR from a parsed MLIR module (jaxlib.mlir.ir.Module).

    Call it inside the module's context (`with module.context:`) or let it enter the context.
    """
    # The walk allocates many small objects and frees none; the cyclic collector would rescan
    # them again and again, so it is paused (and restored) for the duration.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with module.context:
            return _program_from_module(module, name, platform)
    finally:
        if gc_was_enabled:
            gc.enable()


def _program_from_module(module: Any, name: str | None, platform: str) -> Program:
    main, funcs = _entry_function(module)
    mod_name = _str_attr(module.operation, "sym_name")
    prog_name = name or mod_name or "main"
    walker = _Walker(funcs)
    block = main.regions[0].blocks[0]
    env: dict[Any, int] = {}
    input_keys = []
    main_name = _str_attr(main, "sym_name")
    for i, arg in enumerate(block.arguments):
        where = f"argument {i} of @{main_name}"
        key = walker.new_key(walker.ttype(arg.type, functools.partial(str, where)))
        env[arg] = key
        input_keys.append(key)
    nodes: list[_Node] = []
    walker.call_stack.append(main_name)
    returned = walker.walk_block(block, env, (), nodes)
    finisher = _Finisher(walker)
    inputs = tuple(finisher.value(k, -1, True) for k in input_keys)
    ops = finisher.finish_block(nodes, returned, True, "op")
    assumptions = finisher.assumptions
    partitions = _int_attr(module.operation, "mhlo.num_partitions", 1)
    if partitions > 1:
        assumptions.append(f"frontend: the module is partitioned over {partitions} devices; "
                           "tiermap plans it as one device holding the global shapes")
    if finisher.dropped:
        assumptions.append(f"frontend: dropped {finisher.dropped} ops that fold away or whose "
                           "results are unused (XLA drops them too)")
    return Program(
        name=prog_name, ops=tuple(ops), values=finisher.values, inputs=inputs,
        outputs=tuple(finisher.ids[k] for k in returned), platform=platform,
        assumptions=tuple(assumptions),
        source_mlir=module.operation.get_asm(enable_debug_info=False),
        body_values=finisher.body_values,
    )


def stablehlo_op_count(module: Any) -> int:
    """StableHLO and CHLO ops in a parsed module: every function, region bodies included."""
    count = 0
    stack = [module.operation]
    while stack:
        op = stack.pop()
        for region in op.regions:
            for block in region.blocks:
                for wrapped in block.operations:
                    inner = wrapped.operation
                    if inner.name.startswith(("stablehlo.", "chlo.")):
                        count += 1
                    stack.append(inner)
    return count


def _ir_context() -> Any:
    from jax.interpreters import mlir as jax_mlir

    return jax_mlir.make_ir_context()


def parse_module(text: str) -> Any:
    """Parse StableHLO text into a module in a context with every dialect JAX uses.

    Raises:
        UnsupportedProgramError: the text does not parse; the message gives the line and the
            op (an op of an unknown dialect is named with its dialect).
    """
    from jaxlib.mlir import ir

    ctx = _ir_context()
    with ctx:
        try:
            return ir.Module.parse(text)
        except Exception as exc:  # MLIRError: bad text or an unknown dialect
            raise UnsupportedProgramError(_parse_error_message(str(exc), text)) from None


_PARSE_AT = re.compile(r'"[^"]*":(\d+):(\d+): (.*)')
_UNKNOWN_DIALECT = re.compile(r"Dialect `([^']+)' not found for custom op '([^']+)'")


def _parse_error_message(error: str, text: str) -> str:
    fix = "Fix: pass StableHLO text (e.g. jax.jit(f).lower(...).as_text())."
    dialect = _UNKNOWN_DIALECT.search(error)
    at = _PARSE_AT.search(error)
    line_no = int(at.group(1)) if at else 0
    lines = text.splitlines()
    source = lines[line_no - 1].strip() if 0 < line_no <= len(lines) else ""
    if len(source) > 100:
        source = source[:97] + "..."
    where = f"line {line_no}: " if line_no else ""
    if dialect:
        return (f"{where}op '{dialect.group(2)}' of dialect '{dialect.group(1)}' is not "
                f"StableHLO (tiermap reads stablehlo, chlo, func and sdy ops). Fix: convert the "
                "module to StableHLO first, or lower the function with jax.")
    if "unregistered dialect" in error:
        op_name = re.search(r'"?([A-Za-z_][\w]*\.[\w.]+)"?\s*\(', source)
        named = f"op '{op_name.group(1)}' " if op_name else "an op "
        return (f"{where}{named}of an unknown dialect is not StableHLO: `{source}`. "
                "Fix: convert the module to StableHLO first, or lower the function with jax.")
    detail = at.group(3).strip() if at else " ".join(error.strip().splitlines()[:2])
    if len(detail) > 300:
        detail = detail[:297] + "..."
    quoted = f" in `{source}`" if source else ""
    return f"could not parse the module as StableHLO: {where}{detail}{quoted}. {fix}"


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and "{" not in text and (
        text.endswith((".mlir", ".stablehlo", ".txt")) or os.sep in text or os.path.exists(text))


def lower_mlir(text_or_path: str | os.PathLike[str], name: str | None = None,
               platform: str = "cpu") -> Program:
    """Build the IR from a StableHLO module given as text or as a path to a .mlir file."""
    text = os.fspath(text_or_path)
    if isinstance(text_or_path, os.PathLike) or _looks_like_path(text):
        path = text
        if not os.path.isfile(path):
            raise UnsupportedProgramError(f"{path}: no such file; fix: check the path")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        name = name or os.path.splitext(os.path.basename(path))[0]
    module = parse_module(text)
    return program_from_module(module, name=name, platform=platform)


def _is_trace_error(exc: BaseException) -> bool:
    import jax

    trace_errors: tuple[type[BaseException], ...] = (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerBoolConversionError,
        jax.errors.TracerIntegerConversionError,
        jax.errors.NonConcreteBooleanIndexError,
        jax.errors.UnexpectedTracerError,
    )
    return isinstance(exc, trace_errors)


def stablehlo_for(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
                  platform: str = "cpu", static_argnums: Sequence[int] = (),
                  static_argnames: Sequence[str] = ()) -> Any:
    """Trace and lower `fn` for `platform`; returns the jax `Lowered` stage.

    Raises:
        UnsupportedProgramError: `fn` cannot be traced to a static program (data-dependent
            Python control flow, value-dependent shapes) or JAX cannot lower it.
        UserCodeError: `fn` itself raised; wraps the original exception.
    """
    import jax

    fn_name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", type(fn).__name__)
    jitted = jax.jit(fn, static_argnums=tuple(static_argnums),
                     static_argnames=tuple(static_argnames))
    try:
        traced = jitted.trace(*args, **kwargs)
    except Exception as exc:
        if _is_trace_error(exc):
            first = str(exc).strip().splitlines()[0]
            raise UnsupportedProgramError(
                f"{fn_name}: cannot be traced to a static program: {first}. "
                "Fix: make shapes and control flow independent of array values "
                "(use lax.cond/lax.while_loop/jnp.where, or mark the argument static)."
            ) from exc
        raise UserCodeError(f"tracing {fn_name}", exc) from exc
    try:
        return traced.lower(lowering_platforms=(platform,))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedProgramError(
            f"{fn_name}: JAX could not lower it for platform '{platform}': {first}"
        ) from exc


def lower(fn: Callable[..., Any], *args: Any, platform: str = "cpu",
          static_argnums: Sequence[int] = (), static_argnames: Sequence[str] = (),
          **kwargs: Any) -> Program:
    """Trace `fn` on example args (arrays or ShapeDtypeStruct pytrees) and build the IR."""
    lowered = stablehlo_for(fn, args, kwargs, platform, static_argnums, static_argnames)
    module = lowered.compiler_ir("stablehlo")
    name = getattr(fn, "__name__", None) or "main"
    return program_from_module(module, name=name, platform=platform)
