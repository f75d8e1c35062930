"""Loops that share residuals: attention split across jax.grad's two scans, and unread buffers.

jax.grad of a `lax.scan` runs the forward loop, which stacks every residual its backward needs
(one slice per iteration, a `ys` stack), then a second loop that reads those stacks in reverse
(`xs`). An attention in the scanned body leaves its score-shaped intermediates (the
probabilities, exp(S − m)) among the residuals, so loop by loop neither body holds a whole
attention: the forward body writes the scores out and the backward body reads them back, about
as many bytes per layer as all its other residuals together.

`pair_loops(program, bodies, target)` joins each pair of loops where one's `ys` stack goes
straight into the other as `xs` (nothing else reads it) into one program for recognition: the
second body's slice inputs are replaced by the first body's slices that fill their stacks, and
attention recognition (tiermap/fusion/attention.py) runs on the join. An attention whose
forward lies in the first body and whose backward lies in the second becomes two halves
(`AttentionPattern.paired`), which the fusion pass always makes attention groups:

- the forward body's group keeps its score-shaped residuals on chip (not materialized) and
  writes the row statistics (FlashAttention's log-sum-exp) for the backward;
- the backward body's group recomputes the scores from Q and K, tiled by the FlashAttention
  backward rule, so their slices are never read (`Program.unstored` inputs of the body);
- in the enclosing program the score stacks are `unstored`: no tier holds them and neither loop
  moves their bytes (`LoopBody.recomputed_stacks`, `LoopPlan.operand_bytes` and `result_bytes` 0).

This is the plan the unrolled program gets from the same recognition (one attention, forward
and backward fused, the scores recomputed). A target whose on-chip budget fits no attention tile
leaves the loops unpaired.

`pair_loops` also leaves a scan's output buffer unstored when nothing reads its first contents:
the initial value of a `ys` stack that a constant fills (zeros) and the loop overwrites slice by
slice, every slice, before anything reads it; and a loop result that only passes an `xs` or
invariant operand through (the operand's own buffer in XLA's in-place while) when nothing
reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from tiermap.errors import TiermapError
from tiermap.fusion.attention import DOT, LAYOUT_KINDS, AttentionPattern, find_attention
from tiermap.fusion.tiling import (
    elem_bytes_of,
    search_backward_tiles,
    search_forward_tiles,
    tile_budget_bytes,
)
from tiermap.hardware.target import Target
from tiermap.ir.loops import LoopBody, renumber
from tiermap.ir.program import CONSTANT_KIND, Op, Program


@dataclass(frozen=True)
class _Link:
    """A stack that loop `first` writes (operand `j_out`, slice `y` in its body) and loop
    `second` reads (operand `j_in`, slices `xs` in its body)."""

    first: str
    second: str
    j_out: int
    j_in: int
    y: str
    xs: tuple[str, ...]
    stack: str


def _readers(program: Program) -> dict[str, list[Op]]:
    out: dict[str, list[Op]] = {}
    for op in program.ops:
        for vid in dict.fromkeys(op.inputs):
            out.setdefault(vid, []).append(op)
    return out


def _links(program: Program, bodies: Mapping[str, LoopBody]) -> list[_Link]:
    readers = _readers(program)
    outputs = set(program.outputs)
    links = []
    for a, ba in bodies.items():
        op_a = program.op(a)
        for j_out in ba.positions("ys"):
            stack = op_a.outputs[j_out]
            users = readers.get(stack, [])
            if stack in outputs or len(users) != 1 or users[0].id not in bodies:
                continue
            op_b = users[0]
            bb = bodies[op_b.id]
            js = [j for j in bb.positions("xs") if op_b.inputs[j] == stack]
            if len(js) != 1:
                continue
            xs = tuple(s for s, k in bb.slice_inputs.items() if k == js[0])
            links.append(_Link(a, op_b.id, j_out, js[0], ba.operand_outputs[j_out], xs, stack))
    return links


def _joined(first: LoopBody, second: LoopBody, links: list[_Link]) -> Program:
    """The two bodies as one program, the second's linked slices replaced by the first's."""
    p1, p2 = first.program, second.program
    to_first = {x: link.y for link in links for x in link.xs}
    n1 = p1.num_steps
    ops = list(p1.ops)
    for op in p2.ops:
        new = renumber(op, f"op{n1 + op.step}", n1 + op.step)
        ops.append(replace(new, inputs=tuple(to_first.get(v, v) for v in new.inputs)))
    values = dict(p1.values)
    for vid, value in p2.values.items():
        if vid in to_first:
            continue
        values.setdefault(vid, replace(value, producer_step=(
            value.producer_step + n1 if value.producer_step >= 0 else -1)))
    linked = {link.y for link in links}
    inputs = tuple(dict.fromkeys([*p1.inputs, *(v for v in p2.inputs if v not in to_first)]))
    outputs = tuple(dict.fromkeys([*(v for v in p1.outputs if v not in linked), *p2.outputs]))
    return Program(name=f"{p1.name}+{p2.name}", ops=tuple(ops), values=values, inputs=inputs,
                   outputs=outputs, platform=p1.platform,
                   body_values={**p2.body_values, **p1.body_values})


def _fits(p: AttentionPattern, target: Target) -> bool:
    fast_bytes, _ = tile_budget_bytes(target)
    e = elem_bytes_of(p.dtype)
    try:
        search_forward_tiles(p.q_len, p.kv_len, p.head_dim, p.v_head_dim, fast_bytes, e,
                             p.causal, True)
        search_backward_tiles(p.q_len, p.kv_len, p.head_dim, p.v_head_dim, fast_bytes, e,
                              p.causal)
    except TiermapError:
        return False
    return True


@dataclass
class _Halves:
    forward: list[AttentionPattern]
    backward: list[AttentionPattern]
    dropped: set[str]  # slices of the first body that are not stored (score-shaped residuals)


def _split(p: AttentionPattern, joined: Program, n1: int, links: list[_Link],
           second: Program) -> tuple[AttentionPattern, AttentionPattern, set[str]] | None:
    """The forward half (the first body's ids) and the backward half (the second body's) of a
    pattern of the join, and the first body's slices it leaves unstored; None unless it splits.

    The ops of the pattern's backward that lie in the first body (the broadcasts that shape the
    scores and row statistics into stack slices) go with the forward half: the score-shaped
    slices they make stay on chip, the row statistics are stored."""
    def step(oid: str) -> int:
        return int(oid[2:])

    fwd_ops = [o for o in (*p.fwd_op_ids, *p.bwd_op_ids) if step(o) < n1]
    bwd_ops = [o for o in p.bwd_op_ids if step(o) >= n1]
    if not bwd_ops or any(step(o) >= n1 for o in p.fwd_op_ids):
        return None
    dot = next(joined.op(o) for o in p.fwd_op_ids if joined.op(o).kind == DOT)
    score = sorted(d for d in joined.values[dot.outputs[0]].shape if d != 1)
    by_y = {link.y: link for link in links}
    in_fwd = set(fwd_ops)
    first_outputs = set(joined.outputs) | set(by_y)
    dropped: set[str] = set()
    internal = set(p.fwd_internal)
    readers = _readers(joined)
    for oid in fwd_ops:
        for vid in joined.op(oid).outputs:
            if vid in by_y:
                if sorted(d for d in joined.values[vid].shape if d != 1) == score:
                    dropped.add(vid)
            elif vid not in first_outputs and all(r.id in in_fwd for r in readers.get(vid, [])):
                internal.add(vid)
    if not dropped:
        return None
    # Every score-shaped tensor the second body reads of the first's must be one it recomputes.
    for oid in bwd_ops:
        for vid in joined.op(oid).inputs:
            if vid in by_y and vid not in dropped and sorted(
                    d for d in joined.values[vid].shape if d != 1) == score:
                return None
    producer = {v: op for op in joined.ops for v in op.outputs}

    def root(vid: str) -> str:
        """The tensor `vid` is a layout of (through transposes, reshapes, broadcasts)."""
        while (p_ := producer.get(vid)) is not None and p_.kind in LAYOUT_KINDS and p_.inputs:
            vid = p_.inputs[0]
        return vid

    to_second = {link.y: link.xs[0] for link in links}
    by_root = {root(y): x for y, x in sorted(to_second.items())}

    def second_id(vid: str | None) -> str:
        """The second body's name for a tensor of the join: its own, the slice a stack carries
        it (or a layout of it) in; "" where it has none."""
        if vid is None:
            return ""
        if vid in to_second:
            return to_second[vid]
        return vid if vid in second.values else by_root.get(root(vid), "")

    made_here = {v for oid in fwd_ops for v in joined.op(oid).outputs}
    stats = {x for oid in bwd_ops for x in second.op(f"op{step(oid) - n1}").inputs
             if any(x in by_y[y].xs for y in made_here - dropped if y in by_y)}
    forward = replace(
        p, fwd_op_ids=tuple(sorted(fwd_ops, key=step)), bwd_op_ids=(),
        fwd_internal=frozenset(internal | dropped), bwd_internal=frozenset(),
        recomputed=frozenset(), do_id=None, row_inputs_bwd=frozenset(), paired="forward")
    backward = replace(
        p, fwd_op_ids=(), fwd_internal=frozenset(),
        bwd_op_ids=tuple(f"op{step(o) - n1}" for o in sorted(bwd_ops, key=step)),
        bwd_internal=frozenset(v for v in p.bwd_internal if v in second.values),
        recomputed=frozenset(x for y in dropped for x in by_y[y].xs), paired="backward",
        q_id=second_id(p.q_id), k_id=second_id(p.k_id), v_id=second_id(p.v_id),
        o_id=second_id(p.o_id), do_id=second_id(p.do_id) or None,
        row_inputs_bwd=frozenset(stats))
    return forward, backward, dropped


def _unread_inits(program: Program, bodies: Mapping[str, LoopBody]) -> set[str]:
    """Initial values of `ys` stacks that a constant fills and only loops that overwrite every
    slice read."""
    readers = _readers(program)
    producer = {vid: op for op in program.ops for vid in op.outputs}
    covered: dict[str, int] = {}  # init value -> how many of its readers overwrite it whole
    for oid, body in bodies.items():
        op = program.op(oid)
        for j in body.positions("ys"):
            init = op.inputs[j]
            shape = program.values[init].shape
            if body.static_trips and shape and shape[0] == body.trips:
                covered[init] = covered.get(init, 0) + 1
    out = set()
    for init, n in covered.items():
        p = producer.get(init)
        users = readers.get(init, [])
        if (p is not None and p.kind == CONSTANT_KIND and init not in program.outputs
                and len(users) == n and all(u.id in bodies for u in users)
                and all(o in covered for o in p.outputs)):
            out.add(init)
    return out


def _unread_pass_throughs(program: Program, bodies: Mapping[str, LoopBody]) -> set[str]:
    """Results of `xs` and invariant operands (the operand itself, passed through the loop
    unchanged: the same buffer) that nothing reads."""
    readers = _readers(program)
    outputs = set(program.outputs)
    out = set()
    for oid, body in bodies.items():
        op = program.op(oid)
        for j, role in enumerate(body.roles):
            if role in ("xs", "invariant") and j < len(op.outputs):
                vid = op.outputs[j]
                if vid not in outputs and not readers.get(vid):
                    out.add(vid)
    return out


def pair_loops(program: Program, bodies: Mapping[str, LoopBody], target: Target,
               attention: bool = True) -> tuple[Program, dict[str, LoopBody], list[str]]:
    """(the enclosing program with its unstored values, the bodies with their attention halves
    and recomputed stacks, notes); see the module docstring. `attention=False` pairs no
    attention (the unread output buffers are still found)."""
    links = _links(program, bodies) if attention else []
    by_pair: dict[tuple[str, str], list[_Link]] = {}
    for link in links:
        by_pair.setdefault((link.first, link.second), []).append(link)
    halves: dict[str, _Halves] = {}
    recomputed_stacks: dict[str, set[int]] = {}
    unstored: set[str] = set()
    notes: list[str] = []
    for (a, b), pair_links in sorted(by_pair.items()):
        ba, bb = bodies[a], bodies[b]
        joined = _joined(ba, bb, pair_links)
        n1 = ba.program.num_steps
        for p in find_attention(joined):
            split = _split(p, joined, n1, pair_links, bb.program)
            if split is None:
                continue
            if not _fits(p, target):
                notes.append(f"loops {a} and {b}: an attention split across them fits no tile "
                             f"on {target.name}; its scores stay stored residuals")
                continue
            forward, backward, dropped = split
            halves.setdefault(a, _Halves([], [], set())).forward.append(forward)
            halves.setdefault(b, _Halves([], [], set())).backward.append(backward)
            halves[b].dropped |= {x for link in pair_links if link.y in dropped for x in link.xs}
            for link in pair_links:
                if link.y in dropped:
                    recomputed_stacks.setdefault(a, set()).add(link.j_out)
                    recomputed_stacks.setdefault(b, set()).add(link.j_in)
                    unstored.add(link.stack)
            notes.append(f"loops {a} and {b}: attention forward in {a}'s body, backward in "
                         f"{b}'s; {len(dropped)} score-shaped residual stack(s) recomputed, "
                         "not stored")
    inits = _unread_inits(program, bodies)
    passed = _unread_pass_throughs(program, bodies)
    if not halves and not inits and not passed:
        return program, dict(bodies), notes
    out: dict[str, LoopBody] = {}
    for oid, body in bodies.items():
        h = halves.get(oid)
        if h is None:
            out[oid] = body
            continue
        prog = replace(body.program, paired_attention=tuple(h.forward + h.backward),
                       unstored=body.program.unstored | frozenset(h.dropped))
        out[oid] = replace(body, program=prog,
                           recomputed_stacks=frozenset(recomputed_stacks.get(oid, ())))
    ops = []
    for op in program.ops:
        if op.kind == CONSTANT_KIND and op.outputs and all(v in inits for v in op.outputs):
            op = replace(op, bytes_written=0)  # its buffer is overwritten before any read
        ops.append(op)
    if inits:
        notes.append(f"{len(inits)} scan output buffer(s) whose every slice the loop overwrites "
                     "are not stored: " + ", ".join(sorted(inits)))
    if passed:
        notes.append(f"{len(passed)} loop result(s) that pass an operand through unchanged (the "
                     "operand's own buffer) and that nothing reads are not stored")
    outer = replace(program, ops=tuple(ops),
                    unstored=program.unstored | unstored | inits | passed)
    return outer, out, notes
