"""Host offload of intermediates: the plan's moves into a host tier and back, as placements.

A host tier is a residency tier slower than the target's main-memory tier (as in `memory.py`).
For every tensor the plan moves into a host tier (a transfer, or chunks of one, from a device
tier; or an op that writes its output there), and for its way back, the applied program holds
`jax.device_put` placements at the steps the plan chose:

    eviction  [s, e]: before the equation of step s, h = device_put(x, Space.Host);
                      readers after step e read h (the device copy is no longer referenced)
    host write at p:  right after the producer, h = device_put(x, Space.Host)
    prefetch  [s, e]: before the equation of step s, x = device_put(h, Space.Device)

An op the plan lets read the tensor from the host tier (no prefetch before it), and the program's
outputs, get a copy to device memory just before the read (XLA's GPU ops read device memory).
On GPU and TPU XLA keeps these as `annotate_device_placement` custom calls (its host offloader
turns them into copies to and from pinned host memory); on CPU they lower away.

Mapping plan tensors to jaxpr variables. The plan's tensors are values of the StableHLO that the
frontend read from `jax.jit(fn)`; the rewriter runs the jaxpr, calls inlined. `tensor_map`
lowers the inlined jaxpr again for the plan's platform with every equation `i` inside
`jax.named_scope("tiermap_eqn<i>")`, reads it with the same frontend, and aligns its ops with the
plan's program (difflib over each op's kind and result types, constants left out; the two
lowerings differ only in where constants land). An aligned op's location names its equation; its
results that leave the equation's scope (or are program outputs) are the equation's outputs, and
program inputs map by position among the used ones. The steps' equations must come in program
order, else nothing is mapped. Not mapped, and listed as not applied with the reason: tensors
internal to one equation's lowering (e.g. the intermediate of an `integer_pow`), ops the
alignment leaves out, equations with several outputs of the same type, and tensors inside loop
bodies (a body plan's moves are not applied).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from tiermap.apply.jaxpr import bind_env, bind_eqn, eval_jaxpr, is_literal, live_eqns
from tiermap.ir.decisions import Decision
from tiermap.ir.plan import Plan
from tiermap.ir.program import DTYPE_BITS, Program
from tiermap.ir.recompute import RECOMPUTE_OF_ATTR

SCOPE = "tiermap_eqn"
# Equations that lower to their `call_jaxpr` (a custom derivative only matters to autodiff).
CUSTOM_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call"})
_SCOPE_RE = re.compile(SCOPE + r"(\d+)(?:/|$| )")


@dataclass(frozen=True)
class Move:
    """One move of a tensor between tiers, chunks merged: [start_step, end_step] from `src` to
    `dst`; `src` is "" for an output its producer writes in `dst` at `start_step`."""

    tensor: str
    src: str
    dst: str
    start_step: int
    end_step: int
    nbytes: int

    def describe(self) -> str:
        if not self.src:
            return f"written to {self.dst} at step {self.start_step}"
        span = (f"step {self.start_step}" if self.start_step == self.end_step
                else f"steps {self.start_step}-{self.end_step}")
        return f"{self.src}→{self.dst} at {span}"


def host_tiers(plan: Plan) -> frozenset[str]:
    """The residency tiers slower than the target's main-memory tier."""
    names = [t.name for t in plan.target.tiers]
    main = names.index(plan.target.main_tier.name)
    return frozenset(n for i, n in enumerate(names) if i > main)


def host_moves(plan: Plan) -> dict[str, list[Move]]:
    """Per tensor that enters a host tier after step 0 (intermediates, and inputs that start on
    the device), its moves into and out of host tiers in step order."""
    host = host_tiers(plan)
    if not host:
        return {}
    transfers: dict[str, list[Any]] = {}
    for x in plan.transfers:
        transfers.setdefault(x.tensor, []).append(x)
    out: dict[str, list[Move]] = {}
    for t in plan.tensors:
        if not t.residency:
            continue
        first = min(t.residency, key=lambda r: r.from_step)
        moves: list[Move] = []
        if first.tier in host:
            if t.producer_step < 0:
                continue  # a host input: memory.py places it before the call
            moves.append(Move(t.id, "", first.tier, t.producer_step, t.producer_step, t.nbytes))
        for x in sorted(transfers.get(t.id, []), key=lambda x: (x.start_step, x.end_step)):
            last = moves[-1] if moves else None
            if (last is not None and last.src and (last.src, last.dst) == (x.src, x.dst)
                    and last.nbytes < t.nbytes):  # the next chunk of the same move
                moves[-1] = Move(t.id, x.src, x.dst, last.start_step, x.end_step,
                                 last.nbytes + x.bytes)
            else:
                moves.append(Move(t.id, x.src, x.dst, x.start_step, x.end_step, x.bytes))
        moves = [m for m in moves if (m.dst in host) != (m.src in host)]
        if any(m.dst in host for m in moves):
            out[t.id] = moves
    return out


# --- plan tensors → jaxpr variables ---------------------------------------------------------


@dataclass(frozen=True)
class TensorMap:
    """Plan tensor id → (equation index, output index), or (-1, input position) for an input;
    step → the index of the first equation at or after it; why a tensor is not mapped."""

    where: Mapping[str, tuple[int, int]]
    step_eqn: Sequence[int]
    why_not: Mapping[str, str]
    failure: str = ""

    def eqn_at(self, step: int) -> int:
        """The equation the plan's `step` runs in (the next mapped one for a step that is not)."""
        if 0 <= step < len(self.step_eqn):
            return self.step_eqn[step]
        return self.step_eqn[-1] if self.step_eqn and step >= 0 else 0


def _scoped(jaxpr: Any, consts: Sequence[Any]) -> Any:
    def run(*args: Any) -> list[Any]:
        env = bind_env(jaxpr, consts, args)

        def read(v: Any) -> Any:
            return v.val if is_literal(v) else env[v]

        for i, eqn in enumerate(jaxpr.eqns):
            with jax.named_scope(f"{SCOPE}{i}"):
                invals = [read(v) for v in eqn.invars]
                inner = eqn.params.get("call_jaxpr")
                if eqn.primitive.name in CUSTOM_CALLS and isinstance(inner, jcore.ClosedJaxpr):
                    # Lowered as its inner jaxpr, whose equations keep the name stack of their
                    # own trace: evaluated here, they get this equation's scope.
                    outs = eval_jaxpr(inner.jaxpr, inner.consts, invals)
                else:
                    outs = bind_eqn(eqn, invals)
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    return run


def _tokens(program: Program) -> tuple[list[Any], list[str]]:
    # constants, and the ops a recomputation repeats (no equation of the jaxpr is theirs)
    ops = [op for op in program.ops
           if op.kind != "stablehlo.constant" and RECOMPUTE_OF_ATTR not in op.attrs]
    return ops, [op.kind + "|" + ",".join(str(program.values[v].type) for v in op.outputs)
                 for op in ops]


def tensor_map(plan: Plan, jaxpr: Any, consts: Sequence[Any]) -> TensorMap:
    """Map the plan's top-level tensors onto `jaxpr` (the inlined jaxpr the rewriter runs)."""
    # local import: the frontend loads jaxlib's MLIR bindings; only offload needs them here
    from tiermap.frontend.lowering import lower

    program = plan.program
    if program is None:
        return TensorMap({}, [], {}, "the plan carries no program (read from JSON)")
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars]
    try:
        scoped = lower(_scoped(jaxpr, consts), *avals, platform=plan.target.platform)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the moves unapplied
        return TensorMap({}, [], {}, f"the jaxpr could not be lowered again ({exc})")
    where: dict[str, tuple[int, int]] = {}
    why_not: dict[str, str] = {}
    where.update(_input_map(program, jaxpr))
    ours, a = _tokens(program)
    theirs, b = _tokens(scoped)
    scope_of = {op.id: _eqn_of(op.location) for op in scoped.ops}
    users: dict[str, set[int | None]] = {}
    for op in scoped.ops:
        for vid in op.inputs:
            users.setdefault(vid, set()).add(scope_of[op.id])
    outputs = set(scoped.outputs)
    step_eqn = [-1] * len(program.ops)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            mine, other = ours[block.a + k], theirs[block.b + k]
            idx = scope_of[other.id]
            if idx is None:
                continue
            step_eqn[mine.step] = idx
            eqn = jaxpr.eqns[idx]
            for vid, ovid in zip(mine.outputs, other.outputs, strict=True):
                leaves = ovid in outputs or bool(users.get(ovid, set()) - {idx})
                if not leaves:
                    why_not[vid] = (f"internal to the lowering of equation {idx} "
                                    f"({eqn.primitive.name}); no jaxpr variable holds it")
                    continue
                typ = scoped.values[ovid].type
                same = [j for j, v in enumerate(eqn.outvars)
                        if tuple(v.aval.shape) == tuple(typ.shape)
                        and _bits(v.aval.dtype) == DTYPE_BITS.get(typ.dtype)]
                if len(same) == 1:
                    where[vid] = (idx, same[0])
                else:
                    why_not[vid] = (f"equation {idx} ({eqn.primitive.name}) has "
                                    f"{len(same)} outputs of type {typ}")
    mapped = [(step, idx) for step, idx in enumerate(step_eqn) if idx >= 0]
    for (s0, e0), (s1, e1) in zip(mapped, mapped[1:], strict=False):
        # jax lowers equation after equation, and the frontend keeps the order: a step whose
        # equation comes before its predecessor's means the alignment went wrong.
        if e1 < e0:
            return TensorMap({}, [], {}, f"the alignment with the jaxpr is out of order (step "
                                         f"{s1} maps to equation {e1}, step {s0} to {e0})")
    nxt = len(jaxpr.eqns)
    for step in range(len(step_eqn) - 1, -1, -1):  # unmapped steps run with the next mapped one
        if step_eqn[step] < 0:
            step_eqn[step] = nxt
        nxt = step_eqn[step]
    return TensorMap(where, step_eqn, why_not)


def kept_input_positions(jaxpr: Any, num_inputs: int) -> list[int] | None:
    """Positions among the jaxpr's inputs of a program's `num_inputs` inputs. jax.jit leaves
    inputs that nothing uses out of the StableHLO, so the program's inputs are the jaxpr's used
    ones, in order (all of them where the counts agree); None where neither count agrees."""
    live = live_eqns(jaxpr)
    used = {v for i, e in enumerate(jaxpr.eqns) if live[i] for v in e.invars
            if not is_literal(v)} | {v for v in jaxpr.outvars if not is_literal(v)}
    kept = [pos for pos, v in enumerate(jaxpr.invars) if v in used]
    if len(kept) == num_inputs:
        return kept
    return list(range(num_inputs)) if len(jaxpr.invars) == num_inputs else None


def _input_map(program: Program, jaxpr: Any) -> dict[str, tuple[int, int]]:
    """Program input → (-1, position among the jaxpr's inputs), where count and types agree."""
    kept = kept_input_positions(jaxpr, len(program.inputs))
    if kept is None:
        return {}
    for pos, vid in zip(kept, program.inputs, strict=True):
        aval, typ = jaxpr.invars[pos].aval, program.values[vid].type
        if tuple(aval.shape) != tuple(typ.shape) or _bits(aval.dtype) != DTYPE_BITS.get(
                typ.dtype):
            return {}
    return {vid: (-1, pos) for pos, vid in zip(kept, program.inputs, strict=True)}


def _eqn_of(location: str) -> int | None:
    found = _SCOPE_RE.search(location + " ")
    return int(found.group(1)) if found else None


def _bits(dtype: Any) -> int:
    return 8 * np.dtype(dtype).itemsize


# --- the schedule the rewriter follows --------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Before equation `index`: `action` on `var` for the move `move` of `tensor`.

    Actions: "copy-to-host" (make the host copy), "use-host" (readers from now on read the host
    copy), "to-device" (copy back to device memory; readers read that).
    """

    index: int
    action: str
    var: Any
    tensor: str
    move: Move
    producer: int = -1  # the equation that computes `var` (-1: a program input)


@dataclass
class OffloadSchedule:
    """The placements of every mappable host move, by equation, and the decisions so far."""

    placements: dict[int, list[Placement]]
    decisions: list[Decision]
    moves: dict[str, list[Move]]


def offload_schedule(plan: Plan | None, jaxpr: Any, consts: Sequence[Any],
                     tmap: TensorMap | None = None) -> OffloadSchedule:
    """Where the plan's host moves go in `jaxpr`; moves that cannot be placed are decisions
    marked not applied, with the reason. `tmap`: the plan-to-jaxpr map, if already made."""
    moves = host_moves(plan) if plan is not None and plan.sharding is None else {}
    schedule = OffloadSchedule({}, [], moves)
    if not moves or plan is None:
        return schedule
    if tmap is None:
        tmap = tensor_map(plan, jaxpr, consts)
    for tid, tmoves in moves.items():
        text = "; ".join(m.describe() for m in tmoves)
        if tmap.failure:
            schedule.decisions.append(Decision("offload", tid, False,
                                               f"{text}: not applied: {tmap.failure}"))
            continue
        found = tmap.where.get(tid)
        if found is None:
            why = tmap.why_not.get(tid) or _unmapped_reason(plan, tid)
            schedule.decisions.append(Decision("offload", tid, False,
                                               f"{text}: not applied: {why}"))
            continue
        idx, pos = found
        var = jaxpr.invars[pos] if idx < 0 else jaxpr.eqns[idx].outvars[pos]
        if isinstance(var, jcore.DropVar):
            schedule.decisions.append(Decision("offload", tid, False,
                                               f"{text}: not applied: the jaxpr drops it"))
            continue
        after_producer = idx + 1
        for m in tmoves:
            if not m.src:
                first = after_producer
                schedule.placements.setdefault(first, []).append(
                    Placement(first, "copy-to-host", var, tid, m, idx))
                schedule.placements[first].append(Placement(first, "use-host", var, tid, m))
            elif m.dst in host_tiers(plan):
                start = max(tmap.eqn_at(m.start_step), after_producer)
                use = max(tmap.eqn_at(m.end_step + 1), start)
                schedule.placements.setdefault(start, []).append(
                    Placement(start, "copy-to-host", var, tid, m, idx))
                schedule.placements.setdefault(use, []).append(
                    Placement(use, "use-host", var, tid, m))
            else:
                start = max(tmap.eqn_at(m.start_step), after_producer)
                schedule.placements.setdefault(start, []).append(
                    Placement(start, "to-device", var, tid, m))
    for placed in schedule.placements.values():
        order = {"copy-to-host": 0, "use-host": 1, "to-device": 2}
        placed.sort(key=lambda p: (p.move.start_step, order[p.action]))
    return schedule


def _unmapped_reason(plan: Plan, tid: str) -> str:
    program = plan.program
    step = plan.tensor(tid).producer_step
    if program is not None and 0 <= step < len(program.ops):
        op = program.ops[step]
        if op.kind == "stablehlo.constant":
            folded = op.attrs.get("folded_from")
            return ("a constant" + (f" (folded from a {folded})" if folded else "")
                    + ": constants are left out of the alignment with the jaxpr")
    return "its op is not among those the alignment matched with the jaxpr's equations"


def to_host(x: Any) -> Any:
    """Inside the program: `x` (in device memory) placed in host memory. Naming the source
    lets jax.grad move the cotangent back the other way."""
    return jax.device_put(x, jax.memory.Space.Host, src=jax.memory.Space.Device)


def to_device(x: Any) -> Any:
    """Inside the program: `x` (in host memory) placed in device memory."""
    return jax.device_put(x, jax.memory.Space.Device, src=jax.memory.Space.Host)


_PLACEMENT_RE = re.compile(r"@annotate_device_placement\((%[\w#]+)\)")


def count_host_placements(mlir_text: str, intermediates_only: bool = False) -> int:
    """How many `annotate_device_placement` custom calls in `mlir_text` place a value in host
    memory (what an export for GPU keeps of the placements to host). `intermediates_only`:
    leave out those whose operand is a function argument (a program input placed in host)."""
    count = 0
    for line in mlir_text.splitlines():
        found = _PLACEMENT_RE.search(line)
        if found is None or "pinned_host" not in line:
            continue
        if intermediates_only and found.group(1).startswith("%arg"):
            continue
        count += 1
    return count


class OffloadRun:
    """The schedule carried out while the rewriter runs the top-level jaxpr: `fire(idx, env)`
    before equation `idx`, `read(v, env)` for every read, `finish(env)` after the last one."""

    def __init__(self, schedule: OffloadSchedule) -> None:
        self.schedule = schedule
        self.host_copy: dict[Any, Any] = {}
        self.on_host: set[Any] = set()
        self.done: dict[str, list[str]] = {}
        self.failed: dict[str, str] = {}
        self.host_reads: dict[str, int] = {}
        # Device copies made back from host and not read yet; tensors read after a host move.
        self.awaiting: set[Any] = set()
        self.read_back: set[str] = set()
        self._tensor_of: dict[Any, str] = {}
        self._moved = {p.var for placed in schedule.placements.values() for p in placed}
        self._index = 0

    def moves_any(self, variables: Sequence[Any]) -> bool:
        """Whether the schedule moves any of these jaxpr variables to host."""
        return any(not is_literal(v) and v in self._moved for v in variables)

    def fire(self, idx: int, env: dict[Any, Any], read_later: Callable[[Any, int], bool],
             replaced: Container[int] = (), recomputed: Container[int] = ()) -> None:
        """Carry out the placements before equation `idx`; `read_later(var, idx)` says whether
        the applied program still reads `var` from `idx` on (a copy nothing reads is not
        made); `replaced`: the equations that attention kernels replace; `recomputed`: those of
        kernels whose backward recomputes the forward."""
        self._index = idx
        for p in self.schedule.placements.get(idx, ()):
            if p.tensor in self.failed:
                continue
            self._tensor_of[p.var] = p.tensor
            if p.action == "copy-to-host":
                if p.var not in env:
                    inside = (f"computed inside an attention that the applied program replaces "
                              f"by the tiled kernel (equation {p.producer}), which does not "
                              "materialise it; ")
                    self.failed[p.tensor] = (
                        inside + "its backward recomputes it from Q, K and V (brought back "
                        "from host as planned), so nothing of it stays on the device between "
                        "the forward and the backward" if p.producer in recomputed else
                        inside + "the kernel keeps its own softmax statistics on the device"
                        if p.producer in replaced else
                        f"no value at equation {idx}: the equation that computes it is dead")
                    continue
                if not read_later(p.var, idx):
                    self.failed[p.tensor] = (
                        f"nothing in the applied program reads it from equation {idx} on (its "
                        "readers were replaced by an attention kernel, whose backward keeps "
                        "its own residuals from the forward on the device)")
                    continue
                self.host_copy[p.var] = to_host(env[p.var])
                self.done.setdefault(p.tensor, []).append(f"to host before eqn {idx}")
            elif p.action == "use-host":
                if p.var in self.host_copy:
                    env[p.var] = self.host_copy.pop(p.var)
                    self.on_host.add(p.var)
            elif p.var in self.on_host:  # to-device
                self.on_host.discard(p.var)
                env[p.var] = to_device(env[p.var])
                self.awaiting.add(p.var)
                self.done.setdefault(p.tensor, []).append(f"to device before eqn {idx}")

    def read(self, v: Any, env: dict[Any, Any]) -> Any:
        """The value of `v` in device memory (a host-resident value is copied back first)."""
        if v in self.on_host:
            self.on_host.discard(v)
            env[v] = to_device(env[v])
            tid = self._tensor_of.get(v, "?")
            self.host_reads[tid] = self.host_reads.get(tid, 0) + 1
            self.done.setdefault(tid, []).append(f"to device for a read at eqn {self._index}")
            self.read_back.add(tid)
        elif v in self.awaiting:
            self.awaiting.discard(v)
            self.read_back.add(self._tensor_of.get(v, "?"))
        return env[v]

    def finish(self, num_eqns: int, env: dict[Any, Any], read_later: Callable[[Any, int], bool],
               replaced: Container[int] = (), recomputed: Container[int] = ()) -> None:
        """Placements planned after the last equation (before the outputs are read)."""
        for idx in sorted(i for i in self.schedule.placements if i >= num_eqns):
            self.fire(idx, env, read_later, replaced, recomputed)
        self._index = num_eqns

    def decisions(self) -> list[Decision]:
        """Every host move of the plan: applied (with its placements) or not (with why)."""
        out = list(self.schedule.decisions)
        listed = {d.subject for d in out}
        for tid, moves in self.schedule.moves.items():
            if tid in listed:
                continue
            text = "; ".join(m.describe() for m in moves)
            if tid in self.failed:
                out.append(Decision("offload", tid, False,
                                    f"{text}: not applied: {self.failed[tid]}"))
            elif tid not in self.done:
                out.append(Decision("offload", tid, False,
                                    f"{text}: not applied: the rewriter never reached it"))
            elif tid not in self.read_back:
                out.append(Decision("offload", tid, False,
                                    f"{text}: not applied: nothing in the applied program reads "
                                    "the copy brought back (its readers were replaced by an "
                                    "attention kernel, whose backward keeps its own residuals "
                                    "from the forward on the device)"))
            else:
                out.append(Decision("offload", tid, True,
                                    f"{text}: {', '.join(self.done[tid])}"))
        return sorted(out, key=lambda d: _tensor_order(d.subject))


def _tensor_order(tid: str) -> tuple[int, str]:
    digits = tid.removeprefix("t")
    return (int(digits), tid) if digits.isdigit() else (1 << 30, tid)
