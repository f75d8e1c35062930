"""Reading StableHLO with jaxlib's MLIR bindings: parsing text, the entry function, tensor types,
attributes and locations, shared by the frontend's modules (`annotate` included).
"""

from __future__ import annotations

import os
import re
from typing import Any

from tiermap.errors import UnsupportedProgramError
from tiermap.ir.program import DTYPE_BITS, TensorType

# A NameLoc's name: `loc("name"(child))` or `loc("name")`, not a file location `"file":12:3`.
_LOC_NAME = re.compile(r'loc\("([^"]*)"(?!:\d)')
_LOC_PY = re.compile(r'"([^"]+\.py)":(\d+)')
_LOC_ANY = re.compile(r'"([^"]*)":(\d+):\d+')


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


def short_location(loc: Any) -> str:
    """`name @ file.py:line` of an MLIR location: the op's name and its innermost frame."""
    return _format_location(str(loc))


def tensor_type(mlir_type: Any, where: str) -> TensorType:
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


def op_attr(op: Any, name: str) -> Any | None:
    """The attribute `name` of `op`, or None."""
    attrs = op.attributes
    return attrs[name] if name in attrs else None


def ints(attr: Any, length: int | None = None) -> list[int]:
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


def int_attr(op: Any, name: str, default: int) -> int:
    """The integer attribute `name` of `op`; `default` when it has none."""
    from jaxlib.mlir import ir

    attr = op_attr(op, name)
    if attr is None:
        return default
    if isinstance(attr, ir.IntegerAttr):
        return int(attr.value)
    return int(str(attr).split(":")[0])


def str_attr(op: Any, name: str) -> str:
    """The string or symbol attribute `name` of `op` (a symbol without its "@"); "" when none."""
    from jaxlib.mlir import ir

    attr = op_attr(op, name)
    if attr is None:
        return ""
    if isinstance(attr, ir.StringAttr):
        return str(attr.value)
    if isinstance(attr, ir.FlatSymbolRefAttr):
        return str(attr.value)
    return str(attr).strip('"').lstrip("@")


def is_true(attr: Any) -> bool:
    """Whether a boolean attribute is present and true."""
    return attr is not None and str(attr).lower() in ("true", "1")


def entry_function(module: Any) -> tuple[Any, dict[str, Any]]:
    """(entry func.func, every func.func by name): @main, else the first public function."""
    funcs: dict[str, Any] = {}
    for wrapped in module.body.operations:
        op = wrapped.operation
        if op.name == "func.func":
            funcs[str_attr(op, "sym_name")] = op
    if "main" in funcs:
        return funcs["main"], funcs
    public = [f for f in funcs.values() if str_attr(f, "sym_visibility") != "private"]
    if not public:
        raise UnsupportedProgramError(
            "module has no public func.func (expected @main); fix: export the entry point")
    return public[0], funcs


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
