"""Write `tiermap.*` attributes onto the StableHLO ops a Program was built from.

Each IR op remembers where it came from as `Op.mlir_path`: indices from the entry function's block
down to the op. A path step into a `func.call` (or `stablehlo.composite`) continues with the
callee op's index; a step into an op with regions (`while`, `case`, `sdy.manual_computation`)
continues with the region index, then the op's index in that region's block.

The frontend inlines every call site, so one callee op can stand for several IR ops. When an
annotated op lies inside a callee that more than one call site uses, the callee is first
specialised for that call site: it is cloned into a private function named
`<callee>_tiermap_<n>` and the call is retargeted, so each call site carries its own annotations
and the module still computes the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tiermap.frontend.mlir import entry_function, parse_module, str_attr
from tiermap.ir.program import Op, Program

_CALL_KINDS = {"func.call": "callee", "stablehlo.composite": "decomposition"}


def to_attribute(value: Any) -> Any:
    """The MLIR attribute for a Python value (call inside an MLIR context).

    bool → BoolAttr, int → i64 IntegerAttr, float → f64 FloatAttr, str → StringAttr,
    None → UnitAttr, sequences → ArrayAttr, mappings with str keys → DictAttr.
    """
    from jaxlib.mlir import ir

    if isinstance(value, bool):
        return ir.BoolAttr.get(value)
    if isinstance(value, int):
        return ir.IntegerAttr.get(ir.IntegerType.get_signless(64), value)
    if isinstance(value, float):
        return ir.FloatAttr.get_f64(value)
    if isinstance(value, str):
        return ir.StringAttr.get(value)
    if value is None:
        return ir.UnitAttr.get()
    if isinstance(value, Mapping):
        return ir.DictAttr.get({str(k): to_attribute(v) for k, v in value.items()})
    if isinstance(value, Sequence):
        return ir.ArrayAttr.get([to_attribute(v) for v in value])
    if hasattr(value, "item"):  # numpy scalars
        return to_attribute(value.item())
    raise TypeError(
        f"cannot write {type(value).__name__} {value!r} as an MLIR attribute; "
        "use bool, int, float, str, None, or lists/dicts of those")


class _Annotator:
    """Finds ops by `mlir_path` in one parsed module, specialising shared callees on the way."""

    def __init__(self, module: Any) -> None:
        self.module = module
        main, self.funcs = entry_function(module)
        self.main_block = main.regions[0].blocks[0]
        self.blocks: dict[tuple[int, ...], list[Any]] = {}
        self.uses: dict[str, int] = {}
        self.clones = 0
        for fn in self.funcs.values():
            self._count_calls(fn, +1)

    def _count_calls(self, root: Any, delta: int) -> None:
        def visit(op: Any) -> None:
            for region in op.regions:
                for block in region.blocks:
                    for wrapped in block.operations:
                        inner = wrapped.operation
                        attr = _CALL_KINDS.get(inner.name)
                        if attr is not None:
                            callee = str_attr(inner, attr)
                            self.uses[callee] = self.uses.get(callee, 0) + delta
                        visit(inner)

        visit(root)

    def _ops(self, prefix: tuple[int, ...], block: Any) -> list[Any]:
        ops = self.blocks.get(prefix)
        if ops is None:
            ops = [wrapped.operation for wrapped in block.operations]
            self.blocks[prefix] = ops
        return ops

    def _callee_block(self, call: Any) -> Any:
        from jaxlib.mlir import ir

        attr_name = _CALL_KINDS[call.name]
        callee = str_attr(call, attr_name)
        fn = self.funcs[callee]
        if self.uses.get(callee, 0) > 1:
            self.clones += 1
            new_name = f"{callee}_tiermap_{self.clones}"
            while new_name in self.funcs:
                self.clones += 1
                new_name = f"{callee}_tiermap_{self.clones}"
            with ir.InsertionPoint(self.module.body):
                clone = fn.clone()
            clone.attributes["sym_name"] = ir.StringAttr.get(new_name)
            clone.attributes["sym_visibility"] = ir.StringAttr.get("private")
            if attr_name == "callee":
                call.attributes["callee"] = ir.FlatSymbolRefAttr.get(new_name)
            else:
                call.attributes[attr_name] = ir.FlatSymbolRefAttr.get(new_name)
            self.funcs[new_name] = clone
            self.uses[callee] -= 1
            self.uses[new_name] = 1
            self._count_calls(clone, +1)
            fn = clone
        return fn.regions[0].blocks[0]

    def find(self, path: tuple[int, ...], op_id: str) -> Any:
        block = self.main_block
        i = 0
        while True:
            ops = self._ops(path[:i], block)
            index = path[i]
            if index >= len(ops):
                raise ValueError(f"{op_id}: mlir_path {path} does not match the module")
            op = ops[index]
            i += 1
            if i == len(path):
                return op
            if op.name in _CALL_KINDS:
                block = self._callee_block(op)
            elif op.name == "mhlo.fusion":  # inlined by the walker: the path goes straight in
                block = op.regions[0].blocks[0]
            else:
                region = path[i]
                i += 1
                if region >= len(op.regions) or i == len(path):
                    raise ValueError(f"{op_id}: mlir_path {path} does not match the module")
                block = op.regions[region].blocks[0]


def _ops_by_id(program: Program) -> dict[str, Op]:
    return {op.id: op for op in program.walk()}


def annotate_mlir(program: Program, attrs_by_op: Mapping[str, Mapping[str, Any]]) -> str:
    """StableHLO text of `program` with `tiermap.<key>` attributes set on the ops named by id.

    Args:
        program: a Program built by the frontend (it carries its source module).
        attrs_by_op: op id → {key: value}; values are bool, int, float, str, None or lists and
            dicts of those (see `to_attribute`).

    Returns:
        Module text that parses back with the MLIR bindings (`mlir.parse_module`).

    Raises:
        ValueError: the program has no source module, or an op id is not in the program.
        TypeError: a value has no MLIR attribute form.
    """
    from jaxlib.mlir import ir

    if not program.source_mlir:
        raise ValueError(f"program {program.name!r} has no source StableHLO to annotate")
    ops = _ops_by_id(program)
    missing = [op_id for op_id in attrs_by_op if op_id not in ops]
    if missing:
        sample = ", ".join(list(ops)[:5])
        raise ValueError(
            f"op id(s) {', '.join(missing[:5])} not in program {program.name!r} "
            f"(ids look like: {sample})")
    module = parse_module(program.source_mlir)
    with module.context, ir.Location.unknown():
        annotator = _Annotator(module)
        # Deepest paths first is not needed: specialising a callee never moves the ops of the
        # block that holds the call, so paths stay valid in any order.
        for op_id, attrs in attrs_by_op.items():
            target = annotator.find(ops[op_id].mlir_path, op_id)
            for key, value in attrs.items():
                target.attributes[f"tiermap.{key}"] = to_attribute(value)
        return str(module.operation.get_asm(enable_debug_info=False))
