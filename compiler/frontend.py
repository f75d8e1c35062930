"""StableHLO → tiermap IR. The only module that touches MLIR objects (with `annotate`).

`lower(fn, *args)` traces a JAX function with `jax.jit(fn).trace(...).lower(lowering_platforms=...)`;
`lower_mlir(text_or_path)` takes a StableHLO module from any producer. Both walk the module with
jaxlib's MLIR bindings: `func.call`s are inlined, reducers are summarised, `while`/`case`/`if`
bodies are kept as nested ops whose cost is multiplied by the trip count (static where the loop
has the `i = c0; i < c1; i += c2` shape that `lax.scan` and `fori_loop` emit, else assumed 1 and
recorded in `Program.assumptions`).

FLOPs follow XLA's HloCostAnalysis so that `Program.flops` agrees with
`jax.jit(fn).lower(*args).cost_analysis()["flops"]`: one flop per element of an elementwise op,
transcendentals apart, 2·m·n·k for a dot, 2 FMAs per valid kernel tap for a convolution,
(in − out) reducer applications for a reduce.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tiermap.compiler.ir import DTYPE_BITS, Op, Program, TensorType, Value
from tiermap.errors import UnsupportedProgramError, UserCodeError

# --- op classes (XLA HloCostAnalysis conventions) -------------------------------------------

TRANSCENDENTAL = frozenset({
    "exponential", "exponential_minus_one", "log", "log_plus_one", "logistic", "sqrt", "rsqrt",
    "cbrt", "tanh", "sine", "cosine", "tan", "atan2", "power", "erf", "acos", "acosh", "asin",
    "asinh", "atan", "atanh", "cosh", "sinh", "lgamma", "digamma", "erfc",
})
ELEMENTWISE = frozenset({
    "add", "subtract", "multiply", "divide", "remainder", "maximum", "minimum", "negate", "abs",
    "sign", "floor", "ceil", "round_nearest_afz", "round_nearest_even", "and", "or", "xor", "not",
    "shift_left", "shift_right_arithmetic", "shift_right_logical", "compare", "select", "clamp",
    "convert", "is_finite", "popcnt", "count_leading_zeros", "real", "imag", "complex",
    "reduce_precision", "bitcast_convert", "next_after", "polygamma", "zeta", "is_inf",
    "is_neg_inf", "is_pos_inf", "conj", "square",
})
# Data movement: no flops; compulsory traffic is reading what is used and writing the result.
MOVEMENT = frozenset({
    "broadcast_in_dim", "broadcast", "transpose", "slice", "concatenate", "pad", "reverse",
    "iota", "constant", "copy", "dynamic_slice", "dynamic_update_slice", "gather", "get_tuple_element",
    "tuple", "optimization_barrier", "real_dynamic_slice", "after_all", "create_token",
    "partition_id", "replica_id", "get_dimension_size", "reshape",
})
# chlo ops that XLA expands into HLO: measured flops and transcendentals per element, f32.
CHLO_EXPANSION = {"erf_inv": (38.0, 2.0), "erf": (0.0, 1.0), "top_k": (0.0, 0.0)}
FREE_KINDS = frozenset({"reshape", "get_tuple_element", "tuple", "optimization_barrier",
                        "after_all", "create_token", "partition_id", "replica_id"})

_FLOAT_PRIORITY = ("f64", "f32", "bf16", "f16")
_LOC_NAME = re.compile(r'loc\("([^"]*)"')
_LOC_FILE = re.compile(r'"([^"]+\.py)":(\d+)')
_INT_SPLAT = re.compile(r"dense<(-?\d+)>")


def _dtype_name(element_type: Any) -> str:
    s = str(element_type)
    if s.startswith("complex<"):
        inner = s[len("complex<"):-1]
        return "c64" if inner == "f32" else "c128"
    if s.startswith("!stablehlo.token"):
        return "token"
    return s


def _short_location(loc: Any) -> str:
    text = str(loc)
    name = _LOC_NAME.search(text)
    where = _LOC_FILE.search(text)
    parts = []
    if name:
        parts.append(name.group(1))
    if where:
        parts.append(f"{os.path.basename(where.group(1))}:{where.group(2)}")
    return " @ ".join(parts)


@dataclass
class _Builder:
    """Mutable state while walking one module; produces an immutable Program."""

    program_name: str
    platform: str
    values: dict[str, Value] = field(default_factory=dict)
    body_values: dict[str, Value] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    next_value: int = 0
    const_ints: dict[Any, int] = field(default_factory=dict)
    funcs: dict[str, Any] = field(default_factory=dict)
    call_depth: int = 0

    def new_value(self, ttype: TensorType, producer_step: int, top: bool) -> str:
        vid = f"t{self.next_value}"
        self.next_value += 1
        (self.values if top else self.body_values)[vid] = Value(vid, ttype, producer_step)
        return vid


def _tensor_type(mlir_type: Any, where: str) -> TensorType:
    from jaxlib.mlir import ir

    s = str(mlir_type)
    if s.startswith("!stablehlo.token"):
        return TensorType((), "token")
    try:
        rt = mlir_type if isinstance(mlir_type, ir.RankedTensorType) else ir.RankedTensorType(
            mlir_type)
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
        raise UnsupportedProgramError(f"{where}: element type {dtype} is not supported")
    return TensorType(tuple(int(d) for d in rt.shape), dtype)


def _attr(op: Any, name: str) -> Any | None:
    attrs = op.attributes
    return attrs[name] if name in attrs else None


def _ints(attr: Any) -> list[int]:
    """Integer list from a DenseI64ArrayAttr, DenseIntElementsAttr or ArrayAttr."""
    if attr is None:
        return []
    text = str(attr)
    inner = text
    if text.startswith("array<"):
        inner = text.split(":", 1)[1].rstrip(">") if ":" in text else ""
    elif text.startswith("dense<"):
        inner = text[len("dense<"): text.rindex(">")]
    return [int(x) for x in re.findall(r"-?\d+", inner.split(":")[0])]


def _compute_dtype(types: Iterable[TensorType]) -> str:
    names = [t.dtype for t in types]
    for cand in _FLOAT_PRIORITY:
        if cand in names:
            return cand
    return names[0] if names else "f32"


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
        if inner.operation.results and "tensor" in str(inner.operation.results[0].type):
            try:
                n = max(1, _tensor_type(inner.operation.results[0].type, name).num_elements)
            except UnsupportedProgramError:
                n = 1
        if short in TRANSCENDENTAL:
            trans += n
        elif short in ELEMENTWISE:
            flops += n
    return flops, trans, kinds


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


def _conv_cost(op: Any, ins: list[TensorType], outs: list[TensorType]) -> tuple[float, dict]:
    from jaxlib.mlir.dialects import stablehlo as sh

    dn = sh.ConvDimensionNumbers(_attr(op, "dimension_numbers"))
    lhs, rhs, out = ins[0], ins[1], outs[0]
    n_sp = len(dn.input_spatial_dimensions)
    strides = _ints(_attr(op, "window_strides")) or [1] * n_sp
    pad = _ints(_attr(op, "padding")) or [0] * (2 * n_sp)
    lhs_dil = _ints(_attr(op, "lhs_dilation")) or [1] * n_sp
    rhs_dil = _ints(_attr(op, "rhs_dilation")) or [1] * n_sp
    fgc_attr = _attr(op, "feature_group_count")
    bgc_attr = _attr(op, "batch_group_count")
    fgc = int(str(fgc_attr).split(":")[0]) if fgc_attr is not None else 1
    bgc = int(str(bgc_attr).split(":")[0]) if bgc_attr is not None else 1
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


def _dot_cost(op: Any, ins: list[TensorType], outs: list[TensorType]) -> tuple[float, dict]:
    from jaxlib.mlir.dialects import stablehlo as sh

    dn = sh.DotDimensionNumbers(_attr(op, "dot_dimension_numbers"))
    lhs, rhs = ins[0], ins[1]
    batch = math.prod(lhs.shape[d] for d in dn.lhs_batching_dimensions)
    k = math.prod(lhs.shape[d] for d in dn.lhs_contracting_dimensions)
    lhs_free = set(range(len(lhs.shape))) - set(dn.lhs_batching_dimensions) - set(
        dn.lhs_contracting_dimensions)
    rhs_free = set(range(len(rhs.shape))) - set(dn.rhs_batching_dimensions) - set(
        dn.rhs_contracting_dimensions)
    m = math.prod(lhs.shape[d] for d in lhs_free)
    n = math.prod(rhs.shape[d] for d in rhs_free)
    flops = 2.0 * outs[0].num_elements * k
    return flops, {"batch": batch, "m": m, "n": n, "k": k}


def _op_cost(kind: str, op: Any, ins: list[TensorType], outs: list[TensorType]
             ) -> tuple[float, float, int, int, dict, list[str]]:
    """(flops, transcendentals, bytes_read, bytes_written, attrs, notes) of one execution."""
    dialect, short = kind.split(".", 1)
    out_elems = sum(t.num_elements for t in outs)
    read = sum(t.nbytes for t in ins)
    written = sum(t.nbytes for t in outs)
    attrs: dict[str, Any] = {}
    notes: list[str] = []
    flops = trans = 0.0
    if dialect == "chlo":
        per_f, per_t = CHLO_EXPANSION.get(short, (1.0, 0.0))
        if short not in CHLO_EXPANSION:
            notes.append(f"chlo.{short}: flops estimated as 1 per element")
        flops, trans = per_f * out_elems, per_t * out_elems
    elif short in TRANSCENDENTAL:
        trans = out_elems
    elif short in ELEMENTWISE:
        flops = out_elems
    elif short == "dot_general":
        flops, attrs = _dot_cost(op, ins, outs)
    elif short == "dot":
        k = ins[0].shape[-1] if ins[0].shape else 1
        flops = 2.0 * out_elems * k
        attrs = {"batch": 1, "m": ins[0].shape[0] if len(ins[0].shape) == 2 else 1,
                 "n": ins[1].shape[-1] if len(ins[1].shape) == 2 else 1, "k": k}
    elif short == "convolution":
        flops, attrs = _conv_cost(op, ins, outs)
    elif short in ("reduce", "reduce_window", "select_and_scatter", "scatter", "map", "sort"):
        region = op.regions[-1].blocks[0].operations if op.regions else []
        body_f, body_t, body_kinds = _region_scalar_flops(list(region))
        attrs["body"] = "+".join(body_kinds) or "-"
        n_in = len(ins) // 2 if short in ("reduce", "reduce_window") else len(ins)
        data_in = ins[:n_in] if n_in else ins
        if short == "reduce":
            apps = data_in[0].num_elements - outs[0].num_elements
        elif short == "reduce_window":
            window = math.prod(_ints(_attr(op, "window_dimensions")) or [1])
            apps = outs[0].num_elements * (window - 1)
            attrs["window"] = window
        elif short == "select_and_scatter":
            window = math.prod(_ints(_attr(op, "window_dimensions")) or [1])
            select_region = op.regions[0].blocks[0].operations
            sel_f, _, _ = _region_scalar_flops(list(select_region))
            src = ins[1].num_elements
            flops = src * (window - 1) * sel_f + src * body_f
            apps = 0
        elif short == "scatter":
            n_ops = (len(ins) - 1) // 2
            updates = ins[n_ops + 1:]
            apps = updates[0].num_elements
            read = sum(t.nbytes for t in updates) * 2 + ins[n_ops].nbytes
            written = sum(t.nbytes for t in updates)
        elif short == "map":
            apps = outs[0].num_elements
        else:  # sort: comparison based n·log n over the first operand
            elems = ins[0].num_elements
            flops = float(elems * max(0, math.ceil(math.log2(elems)) if elems > 1 else 0))
            apps = 0
        flops += apps * body_f
        trans += apps * body_t
    elif short in ("rng", "rng_bit_generator"):
        trans = out_elems
    elif short == "triangular_solve":
        flops = 2.0 * ins[0].shape[-1] * ins[1].num_elements
    elif short == "cholesky":
        flops = float(ins[0].shape[-1] * ins[0].num_elements // 3)
    elif short == "fft":
        flops = 8.0 * max(1, math.prod(int(math.log2(d)) for d in _ints(_attr(op, "fft_length"))
                                       )) * ins[0].num_elements
    elif short == "custom_call":
        target = _attr(op, "call_target_name")
        attrs["target"] = str(target).strip('"') if target is not None else "?"
        notes.append(f"custom_call @{attrs['target']}: cost unknown, counted as data movement")
    elif short in MOVEMENT:
        if short in ("dynamic_slice", "slice", "real_dynamic_slice"):
            read = written + sum(t.nbytes for t in ins[1:])
        elif short == "gather":
            read = written + (ins[1].nbytes if len(ins) > 1 else 0)
        elif short == "dynamic_update_slice":
            read = ins[1].nbytes + sum(t.nbytes for t in ins[2:])
            written = ins[1].nbytes
        elif short == "iota" or short == "constant":
            read = 0
        if short in FREE_KINDS:
            read = written = 0
    else:
        notes.append(f"{kind}: no cost rule, counted as data movement")
    attrs["compute_dtype"] = _compute_dtype(ins or outs)
    return flops, trans, int(read), int(written), attrs, notes


class _Walker:
    """Walks one func body into ops; inlines calls; nests loop and branch bodies."""

    def __init__(self, builder: _Builder) -> None:
        self.b = builder

    # The env maps MLIR values to IR value ids.
    def walk_block(self, block: Any, env: dict[Any, str], top: bool, path: tuple[int, ...],
                   out: list[Op], step_base: Callable[[], int], prefix: str = "") -> list[str]:
        """Append the ops of `block` to `out`; returns the ids the terminator returns."""
        returned: list[str] = []
        for index, wrapped in enumerate(block.operations):
            op = wrapped.operation
            name = op.name
            where = f"{name} at {_short_location(op.location)}"
            if name in ("func.return", "stablehlo.return"):
                returned = [env[v] for v in op.operands]
                continue
            if name == "func.call":
                callee = str(_attr(op, "callee")).lstrip("@")
                fn = self.b.funcs.get(callee)
                if fn is None:
                    raise UnsupportedProgramError(f"{where}: calls unknown function @{callee}")
                self.b.call_depth += 1
                if self.b.call_depth > 64:
                    raise UnsupportedProgramError(f"{where}: recursion through @{callee}")
                inner_block = fn.regions[0].blocks[0]
                inner_env = dict(env)
                for arg, operand in zip(inner_block.arguments, op.operands, strict=True):
                    inner_env[arg] = env[operand]
                    if operand in self.b.const_ints:
                        self.b.const_ints[arg] = self.b.const_ints[operand]
                results = self.walk_block(inner_block, inner_env, top, path + (index,), out,
                                          step_base, prefix)
                self.b.call_depth -= 1
                for res, vid in zip(op.results, results, strict=True):
                    env[res] = vid
                continue
            dialect = name.split(".", 1)[0]
            if dialect not in ("stablehlo", "chlo", "mhlo"):
                raise UnsupportedProgramError(
                    f"{where}: op '{name}' of dialect '{dialect}' is not StableHLO. "
                    "Fix: lower with jax (which emits StableHLO) or convert the module first."
                )
            kind = "stablehlo." + name.split(".", 1)[1] if dialect == "mhlo" else name
            for operand in op.operands:
                if operand not in env:
                    raise UnsupportedProgramError(f"{where}: operand defined outside its scope")
            ins_ids = [env[v] for v in op.operands]
            in_types = [self._type_of(v) for v in ins_ids]
            out_types = [_tensor_type(r.type, where) for r in op.results]
            step = step_base() + len(out) if top else len(out)
            short = kind.split(".", 1)[1]
            if short == "constant":
                m = _INT_SPLAT.search(str(_attr(op, "value")))
                if m and out_types[0].num_elements <= 1:
                    self.b.const_ints[op.results[0]] = int(m.group(1))
            body: tuple[Op, ...] = ()
            trips = 1
            notes: list[str] = []
            if short in ("while", "case", "if"):
                op_id = f"op{step}" if top else f"{prefix}{len(out)}"
                flops, trans, body, trips, notes = self._control(op, kind, env, in_types,
                                                                 path + (index,), op_id)
                read = sum(t.nbytes for t in in_types)
                written = sum(t.nbytes for t in out_types)
                attrs: dict[str, Any] = {"compute_dtype": _compute_dtype(in_types or out_types)}
            else:
                flops, trans, read, written, attrs, notes = _op_cost(kind, op, in_types,
                                                                     out_types)
            out_ids = [self.b.new_value(t, step, top) for t in out_types]
            for res, vid in zip(op.results, out_ids, strict=True):
                env[res] = vid
            out.append(Op(
                id=f"op{step}" if top else f"{prefix}{len(out)}",
                kind=kind, step=step, inputs=tuple(ins_ids), outputs=tuple(out_ids),
                flops=float(flops), transcendentals=float(trans),
                bytes_read=int(read), bytes_written=int(written), trip_count=trips,
                attrs=attrs, body=body, location=_short_location(op.location),
                mlir_path=path + (index,), notes=tuple(notes),
            ))
            for note in notes:
                self.b.assumptions.append(f"{out[-1].id}: {note}")
        return returned

    def _type_of(self, vid: str) -> TensorType:
        v = self.b.values.get(vid) or self.b.body_values[vid]
        return v.type

    def _control(self, op: Any, kind: str, env: dict[Any, str], in_types: list[TensorType],
                 path: tuple[int, ...], op_id: str
                 ) -> tuple[float, float, tuple[Op, ...], int, list[str]]:
        short = kind.split(".", 1)[1]
        notes: list[str] = []
        bodies: list[list[Op]] = []
        for r_index, region in enumerate(op.regions):
            block = region.blocks[0]
            inner_env = dict(env)
            if short == "while":
                for arg, operand in zip(block.arguments, op.operands, strict=True):
                    inner_env[arg] = env[operand]
            ops: list[Op] = []
            self.walk_block(block, inner_env, False, path + (r_index,), ops, lambda: 0,
                            f"{op_id}.r{r_index}.")
            bodies.append(ops)
        if short == "while":
            trips = _static_trip_count(op, self.b.const_ints)
            all_ops = bodies[0] + bodies[1]
            per_iter_f = sum(o.flops for o in all_ops)
            per_iter_t = sum(o.transcendentals for o in all_ops)
            if trips is None:
                trips = 1
                notes.append("while loop bound is not static; assumed 1 trip")
            return (per_iter_f * trips, per_iter_t * trips, tuple(all_ops), trips, notes)
        # case / if: the most expensive branch (as XLA does)
        best = max(bodies, key=lambda ops: sum(o.flops for o in ops)) if bodies else []
        flops = max((sum(o.flops for o in ops) for ops in bodies), default=0.0)
        trans = max((sum(o.transcendentals for o in ops) for ops in bodies), default=0.0)
        notes.append(f"{short}: cost of the most expensive of {len(bodies)} branches")
        return flops, trans, tuple(best), 1, notes


def _static_trip_count(op: Any, const_ints: dict[Any, int]) -> int | None:
    """Trip count of `i = c0; while i < c1: i += c2`, the shape lax.scan/fori_loop emit."""
    cond_block = op.regions[0].blocks[0]
    body_block = op.regions[1].blocks[0]
    cond_ops = list(cond_block.operations)
    ret = cond_ops[-1].operation
    if not ret.operands:
        return None
    local_consts = dict(const_ints)
    for wrapped in cond_ops:
        o = wrapped.operation
        if o.name == "stablehlo.constant":
            m = _INT_SPLAT.search(str(_attr(o, "value")))
            if m:
                local_consts[o.results[0]] = int(m.group(1))
    cmp_op = ret.operands[0].owner
    if getattr(cmp_op, "name", "") != "stablehlo.compare":
        return None
    direction = str(_attr(cmp_op, "comparison_direction"))
    lhs, rhs = cmp_op.operands[0], cmp_op.operands[1]
    args = list(cond_block.arguments)
    idx = next((i for i, a in enumerate(args) if a == lhs), None)
    if idx is None or rhs not in local_consts:
        return None
    limit = local_consts[rhs]
    init_v = op.operands[idx]
    if init_v not in const_ints:
        return None
    init = const_ints[init_v]
    body_ret = list(body_block.operations)[-1].operation
    nxt = body_ret.operands[idx].owner
    if getattr(nxt, "name", "") != "stablehlo.add":
        return None
    body_consts = dict(const_ints)
    for wrapped in body_block.operations:
        o = wrapped.operation
        if o.name == "stablehlo.constant":
            m = _INT_SPLAT.search(str(_attr(o, "value")))
            if m:
                body_consts[o.results[0]] = int(m.group(1))
    body_arg = list(body_block.arguments)[idx]
    a, c = nxt.operands[0], nxt.operands[1]
    if a != body_arg:
        a, c = c, a
    if a != body_arg or c not in body_consts:
        return None
    stride = body_consts[c]
    if stride <= 0:
        return None
    if "LT" in direction:
        return max(0, -(-(limit - init) // stride))
    if "LE" in direction:
        return max(0, (limit - init) // stride + 1)
    if "NE" in direction and (limit - init) % stride == 0:
        return max(0, (limit - init) // stride)
    return None


def program_from_module(module: Any, name: str | None = None, platform: str = "cpu") -> Program:
    """Build the IR from a parsed MLIR module (jaxlib.mlir.ir.Module)."""
    funcs: dict[str, Any] = {}
    for wrapped in module.body.operations:
        op = wrapped.operation
        if op.name == "func.func":
            funcs[str(_attr(op, "sym_name")).strip('"')] = op
    if "main" in funcs:
        main = funcs["main"]
    else:
        public = [f for f in funcs.values()
                  if "private" not in str(_attr(f, "sym_visibility") or "")]
        if not public:
            raise UnsupportedProgramError(
                "module has no public func.func (expected @main); fix: export the entry point")
        main = public[0]
    mod_name = _attr(module.operation, "sym_name")
    prog_name = name or (str(mod_name).strip('"') if mod_name is not None else "main")
    builder = _Builder(program_name=prog_name, platform=platform, funcs=funcs)
    block = main.regions[0].blocks[0]
    env: dict[Any, str] = {}
    inputs = []
    for i, arg in enumerate(block.arguments):
        vid = builder.new_value(_tensor_type(arg.type, f"argument {i} of @main"), -1, True)
        env[arg] = vid
        inputs.append(vid)
    ops: list[Op] = []
    returned = _Walker(builder).walk_block(block, env, True, (), ops, lambda: 0)
    return Program(
        name=prog_name, ops=tuple(ops), values=dict(builder.values), inputs=tuple(inputs),
        outputs=tuple(returned), platform=platform, assumptions=tuple(builder.assumptions),
        source_mlir=module.operation.get_asm(enable_debug_info=False),
        body_values=dict(builder.body_values),
    )


def _ir_context() -> Any:
    from jax.interpreters import mlir as jax_mlir

    return jax_mlir.make_ir_context()


def parse_module(text: str) -> Any:
    """Parse StableHLO text into a module in a context with every dialect JAX uses."""
    from jaxlib.mlir import ir

    ctx = _ir_context()
    with ctx:
        try:
            return ir.Module.parse(text)
        except Exception as exc:  # MLIRError: bad text or an unknown dialect
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:4])
            raise UnsupportedProgramError(
                f"could not parse the module as StableHLO: {detail}. "
                "Fix: pass StableHLO text (e.g. jax.jit(f).lower(...).as_text())."
            ) from None


def lower_mlir(text_or_path: str | os.PathLike[str], name: str | None = None,
               platform: str = "cpu") -> Program:
    """Build the IR from a StableHLO module given as text or as a path to a .mlir file."""
    text = str(text_or_path)
    if isinstance(text_or_path, os.PathLike) or (
        "\n" not in text and ("{" not in text) and text.endswith((".mlir", ".stablehlo"))
    ):
        path = os.fspath(text_or_path)
        if not os.path.exists(path):
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
    """Trace and lower `fn` for `platform`; returns the jax `Lowered` stage."""
    import jax

    fn_name = getattr(fn, "__name__", type(fn).__name__)
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
                "(use lax.cond/lax.while_loop, or mark the argument static)."
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
    with module.context:
        return program_from_module(module, name=name, platform=platform)
