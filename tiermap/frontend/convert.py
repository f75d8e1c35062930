"""A parsed StableHLO module → tiermap IR (`program_from_module`).

`walk` walks the module's entry function once with jaxlib's MLIR bindings into nodes, inlining
calls and applying XLA's folds (`folds`) and costs (`costs`); this module drops the dead nodes,
numbers steps and values, and builds the immutable `Op`s and `Value`s:

- ops none of whose results are used (and that have no side effect) are dropped, as XLA drops
  them, and the count is recorded in `Program.assumptions`;
- `while` and `case` bodies are kept as nested ops. A `while` costs its cond + body ops times its
  trip count (static, or assumed 1 and recorded in `Program.assumptions`). A `case` costs its most
  expensive branch, as XLA does; its `body` holds that branch;
- an op's `location` is `name @ file.py:line`: its name and its innermost frame in user code.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Iterable
from typing import Any

from tiermap.frontend.collectives import module_meshes
from tiermap.frontend.mlir import entry_function, int_attr, op_attr, str_attr
from tiermap.frontend.walk import Node, Walker
from tiermap.ir.program import Op, Program, Value

# Frames in these paths are library code; an op's location names the innermost frame outside them.
_LIBRARY_PATHS = ("site-packages", "dist-packages", "/jax/_src/", "<frozen")


class _Finisher:
    """Drops dead nodes, numbers steps and values, and builds `Op`s and `Value`s."""

    def __init__(self, walker: Walker) -> None:
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

    def finish_block(self, nodes: list[Node], roots: Iterable[int], top: bool,
                     prefix: str) -> list[Op]:
        live = set(roots)
        kept: list[Node] = []
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

    def finish_control(self, node: Node, op_id: str
                       ) -> tuple[tuple[Op, ...], float, float, int]:
        short = node.kind.split(".", 1)[1]
        bodies: list[list[Op]] = []
        arg_ids: list[tuple[str, ...]] = []
        result_ids: list[tuple[str, ...]] = []
        for r_index, (args, body, returned) in enumerate(node.regions):
            arg_ids.append(tuple(self.value(k, -1, False) for k in args))
            bodies.append(self.finish_block(body, returned, False, f"{op_id}.r{r_index}."))
            result_ids.append(tuple(self.ids[k] for k in returned))
        if short == "while":
            node.attrs["region_args"] = tuple(arg_ids)
            node.attrs["region_results"] = tuple(result_ids)
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


def program_from_module(module: Any, name: str | None = None, platform: str = "cpu",
                        num_devices: int = 1) -> Program:
    """Build the IR from a parsed MLIR module (jaxlib.mlir.ir.Module).

    `num_devices` > 1: the module is the per-device program XLA's SPMD partitioner made for that
    many devices (`partitioned.py`); its shapes are per device and its collectives move bytes
    between devices. Call it inside the module's context (`with module.context:`) or let it enter
    the context.
    """
    # The walk allocates many small objects and frees none; the cyclic collector would rescan
    # them again and again, so it is paused (and restored) for the duration.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with module.context:
            return _program_from_module(module, name, platform, num_devices)
    finally:
        if gc_was_enabled:
            gc.enable()


def _program_from_module(module: Any, name: str | None, platform: str,
                         num_devices: int) -> Program:
    main, funcs = entry_function(module)
    mod_name = str_attr(module.operation, "sym_name")
    prog_name = name or mod_name or "main"
    walker = Walker(funcs, num_devices, module_meshes(module) if num_devices > 1 else {})
    block = main.regions[0].blocks[0]
    env: dict[Any, int] = {}
    input_keys = []
    main_name = str_attr(main, "sym_name")
    for i, arg in enumerate(block.arguments):
        where = f"argument {i} of @{main_name}"
        key = walker.new_key(walker.ttype(arg.type, functools.partial(str, where)))
        env[arg] = key
        input_keys.append(key)
    nodes: list[Node] = []
    walker.call_stack.append(main_name)
    returned = walker.walk_block(block, env, (), nodes)
    finisher = _Finisher(walker)
    inputs = tuple(finisher.value(k, -1, True) for k in input_keys)
    ops = finisher.finish_block(nodes, returned, True, "op")
    assumptions = finisher.assumptions
    partitions = int_attr(module.operation, "mhlo.num_partitions", 1)
    in_shardings: tuple[str, ...] = ()
    out_shardings: tuple[str, ...] = ()
    if num_devices > 1:
        in_shardings = _shardings(main, "arg_attrs", len(inputs))
        out_shardings = _shardings(main, "res_attrs", len(returned))
        written = op_attr(module.operation, "mhlo.spmd_output_sharding")
        if written is not None and all(x == "{replicated}" for x in out_shardings):
            out_shardings = _split_tuple_sharding(str_attr(module.operation,
                                                           "mhlo.spmd_output_sharding"),
                                                  len(returned))
        assumptions.append(f"frontend: the per-device program of XLA's SPMD partitioner for "
                           f"{num_devices} devices: shapes are per device, collectives move "
                           "bytes between devices")
    elif partitions > 1:
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
        body_values=finisher.body_values, num_devices=num_devices,
        input_shardings=in_shardings, output_shardings=out_shardings,
    )


def _split_tuple_sharding(text: str, count: int) -> tuple[str, ...]:
    """The parts of an HLO tuple sharding "{{replicated}, {devices=[8,1]<=[8]}}"."""
    inner = text.strip()
    if inner.startswith("{{") and inner.endswith("}}"):
        inner = inner[1:-1]
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(inner):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                parts.append(inner[start:i + 1])
    if len(parts) != count:  # one sharding for every output
        parts = [text.strip()] * count
    return tuple(parts)


def _shardings(main: Any, key: str, count: int) -> tuple[str, ...]:
    """The `mhlo.sharding` of each argument (`arg_attrs`) or result (`res_attrs`) of `main`;
    "{replicated}" where none is written."""
    from jaxlib.mlir import ir

    attr = op_attr(main, key)
    found = ["{replicated}"] * count
    if attr is None:
        return tuple(found)
    for i, entry in enumerate(ir.ArrayAttr(attr)):
        if i >= count:
            break
        d = ir.DictAttr(entry)
        if "mhlo.sharding" in d:
            found[i] = str(ir.StringAttr(d["mhlo.sharding"]).value)
    return tuple(found)
