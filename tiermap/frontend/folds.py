"""The folds that XLA's StableHLO → HLO conversion applies; the walk applies them too, so that
FLOP counts match XLA's and the schedule holds only ops that run:

- an op whose operands are all constants becomes a `stablehlo.constant` (no inputs,
  `attrs["folded_from"]` names the original kind), except the kinds in `NOT_CONSTANT_FOLDED`;
  so does an iota along a dimension of size 1;
- identities vanish and their result is the operand itself: `x + 0`, `x - 0`, `x · 1`,
  `x or false`, `x xor false`, `x and true`, `select` with a constant predicate or equal branches,
  a `convert` to the same type; absorbing constants fold (`x and false`, `x or true`, integer
  `x · 0`).

Constants are known by their splat value (`splat_value`); a constant whose elements differ is
`_NONSPLAT`.
"""

from __future__ import annotations

from typing import Any

from tiermap.frontend.mlir import op_attr
from tiermap.ir.program import DTYPE_BITS, TensorType

# Elementwise kinds that XLA's StableHLO → HLO conversion does not fold on constant operands
# (measured); every other elementwise, transcendental and movement op on constants is folded.
NOT_CONSTANT_FOLDED = frozenset({
    "cbrt", "ceil", "floor", "exponential_minus_one", "log_plus_one", "is_finite", "atan2",
    "power", "shift_left", "shift_right_logical", "shift_right_arithmetic", "popcnt",
    "count_leading_zeros", "reduce_precision", "bitcast_convert", "real", "imag", "complex",
    "iota", "dynamic_slice", "dynamic_update_slice", "gather", "copy",
})
FOLDABLE_MOVEMENT = frozenset({
    "broadcast_in_dim", "broadcast", "reshape", "transpose", "slice", "reverse", "concatenate",
    "pad",
})
_NONSPLAT = object()  # constant value whose elements differ (or are unknown)


def splat_value(attr: Any) -> Any:
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


def fold(short: str, ins: list[int], in_types: list[TensorType], out: TensorType,
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
            direction = str(op_attr(op, "comparison_direction"))
            for key, fn in (("EQ", a == b), ("NE", a != b), ("LT", a < b), ("LE", a <= b),
                            ("GT", a > b), ("GE", a >= b)):
                if key in direction:
                    return fn
    except (ArithmeticError, TypeError, ValueError):
        return _NONSPLAT
    return _NONSPLAT
