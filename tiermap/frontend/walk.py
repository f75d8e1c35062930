"""Walks a module's entry function into `Node`s: calls inlined, folds applied, bodies nested.

- `func.call`s (and `stablehlo.composite`s) are inlined: every call site gets its own ops, whose
  `mlir_path` is the call's path followed by the callee op's index.
- Reducers are summarised (`costs`); `while` and `case` bodies are walked into nested nodes. A
  `while`'s trip count is static where the loop has the `i = c0; i < c1; i += c2` shape that
  `lax.scan` and `fori_loop` emit, else assumed 1 and noted.
- An `mhlo.fusion` (in the optimised, partitioned program XLA compiled; see `partitioned.py`) is
  inlined like a call: tiermap fuses again with its own passes.
- Collectives (`all_reduce`, `all_gather`, ...) get their device groups and payload bytes
  (`collectives.py`); `num_devices` is the partition count of the module.
- Values a region reads from outside (implicit captures) are appended to the node's inputs;
  `attrs["num_operands"]` says how many inputs are real operands.

Folds (`folds`) never look across a function boundary, as in XLA where each callee is a
computation of its own: inside a callee its parameters are unknown values, and call results are
unknown to the caller. Shardy sharding annotations (which XLA turns into custom calls) pass values
through unchanged but also hide them from folds; a `sdy.manual_computation` on one device is
inlined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tiermap.errors import UnsupportedProgramError
from tiermap.frontend.collectives import collective_attrs
from tiermap.frontend.costs import compute_dtype, op_cost
from tiermap.frontend.folds import FOLDABLE_MOVEMENT, fold, splat_value
from tiermap.frontend.mlir import int_attr, is_true, op_attr, short_location, str_attr, tensor_type
from tiermap.ir.ops import COLLECTIVES, ELEMENTWISE, TRANSCENDENTAL
from tiermap.ir.program import TensorType

# Ops kept even when nothing reads their results.
_SIDE_EFFECT_KINDS = frozenset({
    "send", "recv", "infeed", "outfeed", "after_all", "create_token", "rng_bit_generator",
})
# Shardy ops that only annotate their operand; the frontend passes the operand through.
_SDY_PASS_THROUGH = frozenset({
    "sdy.sharding_constraint", "sdy.reshard", "sdy.propagation_barrier",
})


@dataclass
class Node:
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
    regions: list[tuple[list[int], list[Node], list[int]]] = field(default_factory=list)
    trips: int = 1


class Walker:
    """Walks a module's entry function into `Node`s: inlines calls, folds, nests bodies."""

    def __init__(self, funcs: dict[str, Any], num_devices: int = 1,
                 meshes: dict[str, dict[str, int]] | None = None) -> None:
        self.funcs = funcs
        self.num_devices = num_devices
        self.meshes = meshes or {}
        self.types: dict[int, TensorType] = {}  # value key -> type
        # Constants of the function being walked (regions see their parent's): value key ->
        # splat python value or `folds._NONSPLAT`.
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
            cached = tensor_type(mlir_type, where())
            self.type_cache[mlir_type] = cached
        return cached

    # --- blocks -----------------------------------------------------------------------------

    def walk_block(self, block: Any, env: dict[Any, int], path: tuple[int, ...],
                   nodes: list[Node]) -> list[int]:
        """Append the nodes of `block` to `nodes`; returns the keys its terminator returns."""
        returned: list[int] = []
        for index, wrapped in enumerate(block.operations):
            op = wrapped.operation
            name = op.name
            if name in ("func.return", "stablehlo.return", "sdy.return", "mhlo.return"):
                alias = self.alias
                returned = [alias.get(env[v], env[v]) for v in op.operands]
                continue
            if name == "func.call":
                self._inline(op, str_attr(op, "callee"), env, path + (index,), nodes)
                continue
            if name == "stablehlo.composite":
                self._inline(op, str_attr(op, "decomposition"), env, path + (index,), nodes)
                continue
            if name == "mhlo.fusion":
                self._inline_block(op, op.regions[0].blocks[0], env, path + (index,), nodes)
                continue
            if name.startswith("sdy."):
                self._sharding_op(op, name, env, path + (index,), nodes)
                continue
            self._op(op, name, env, path + (index,), nodes)
        return returned

    def _where(self, op: Any) -> str:
        return f"{op.name} at {short_location(op.location) or 'unknown location'}"

    def _inline(self, op: Any, callee: str, env: dict[Any, int], path: tuple[int, ...],
                nodes: list[Node]) -> None:
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
        self._inline_block(op, fn.regions[0].blocks[0], env, path, nodes)
        self.call_stack.pop()

    def _inline_block(self, op: Any, inner_block: Any, env: dict[Any, int],
                      path: tuple[int, ...], nodes: list[Node]) -> None:
        # XLA keeps each callee a computation of its own: its parameters and the call's results
        # are values of their own (no constant folds or identities across the call), so they
        # get alias keys, which stand for the same IR value.
        inner_env = {arg: self.alias_of(env[v]) for arg, v in zip(inner_block.arguments,
                                                                  op.operands, strict=True)}
        caller_consts, self.consts = self.consts, {}
        results = self.walk_block(inner_block, inner_env, path, nodes)
        self.consts = caller_consts
        for res, key in zip(op.results, results, strict=True):
            env[res] = self.alias_of(key)

    def _sharding_op(self, op: Any, name: str, env: dict[Any, int], path: tuple[int, ...],
                     nodes: list[Node]) -> None:
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
            nodes: list[Node]) -> None:
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
            consts[key] = splat_value(op_attr(op, "value"))
            env[op.results[0]] = key
            nodes.append(Node(kind, path, [], [key], written=out_types[0].nbytes,
                              attrs={"compute_dtype": out_types[0].dtype}, loc=op.location))
            return
        if short == "iota" and out_types[0].shape[int_attr(op, "iota_dimension", 0)] == 1:
            # An iota along a dimension of size 1 is all zeros; XLA folds it to a constant.
            key = self.new_key(out_types[0])
            consts[key] = 0.0 if out_types[0].dtype.startswith(("f", "bf")) else 0
            env[op.results[0]] = key
            nodes.append(Node("stablehlo.constant", path, [], [key],
                              written=out_types[0].nbytes,
                              attrs={"compute_dtype": out_types[0].dtype,
                                     "folded_from": kind}, loc=op.location))
            return
        if ins and len(out_types) == 1 and (short in ELEMENTWISE or short in TRANSCENDENTAL
                                            or short in FOLDABLE_MOVEMENT
                                            or dialect == "chlo"):
            folded = fold(short, ins, in_types, out_types[0], consts, op)
            if folded is not None:
                how, what = folded
                if how == "alias":
                    env[op.results[0]] = what
                    return
                key = self.new_key(out_types[0])
                consts[key] = what
                env[op.results[0]] = key
                nodes.append(Node("stablehlo.constant", path, [], [key],
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
            node = Node(kind, path, ins, [], loc=op.location)
            node.flops, node.trans, node.read, node.written, node.attrs = op_cost(
                dialect, short, op, in_types, out_types, node.notes)
            if short in COLLECTIVES:
                node.attrs.update(collective_attrs(op, short, in_types, out_types,
                                                   self.num_devices, self.meshes))
            if short == "custom_call":
                node.side_effect = is_true(op_attr(op, "has_side_effect"))
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
                 path: tuple[int, ...]) -> Node:
        node = Node(kind, path, list(ins), [], loc=op.location,
                    read=sum(t.nbytes for t in in_types),
                    written=sum(t.nbytes for t in out_types),
                    attrs={"compute_dtype": compute_dtype(in_types or out_types),
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
            body: list[Node] = []
            returned = self.walk_block(block, inner_env, path + (r_index,), body)
            node.regions.append((args, body, returned))
            region_envs.append(inner_env)
        if short == "while":
            trips = _static_trip_count(op, env, region_envs, self.consts)
            node.attrs["static_trips"] = trips is not None
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


def _captured(regions: list[tuple[list[int], list[Node], list[int]]]) -> list[int]:
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
    direction = str(op_attr(cmp_op, "comparison_direction"))
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
