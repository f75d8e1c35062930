"""Recognise attention in the IR: the forward chain and the backward that `jax.grad` produces.

Forward: a `dot_general` D1 (scores `S = Q·Kᵀ`), then a chain of elementwise ops, broadcasts,
reshapes/transposes and row reductions — scale multiply/divide, bias add, masks (select), causal
masks built from iota/compare, softmax (reduce max, subtract, exp, reduce sum, divide, and the
`max(-inf, ·)`/stop-gradient variants JAX emits) — ending in a second `dot_general` D2 that
contracts the probabilities with V over the key/value axis. This covers
`jax.nn.dot_product_attention(implementation="xla")`, flax's attention and hand-written
`softmax(q @ k.T) @ v`, batched and multi-head (batch dims of the dot_generals).

Backward: the ops that read the forward's score-shaped tensors (P, exp(S − m)) outside the forward
group, grown through score- and row-shaped elementwise/reduce ops, plus the dot_generals at its
edges: dP = dO·Vᵀ (pulled in as the producer of a score-shaped input), dV = Pᵀ·dO, dQ = dS·K,
dK = dSᵀ·Q (terminal: their outputs leave the group).

The IR keeps only a dot's batch/m/n/k, so roles are read from sizes: a tensor is *score-shaped*
when its dims other than 1 are, as a multiset, those of S; *row-shaped* when they are S's without
one key/value dim. Where the query and key lengths are equal the dot's left operand is taken as Q.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tiermap.ir.program import Op, Program, Value

DOT = "stablehlo.dot_general"
# Ops that may sit on the score chain between the two products (and in the backward).
CHAIN_KINDS = frozenset({
    "stablehlo." + k for k in (
        "add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "exponential",
        "log", "select", "compare", "convert", "broadcast_in_dim", "broadcast", "reshape",
        "transpose", "reduce", "copy", "and", "or", "not", "abs", "clamp", "reduce_precision",
        "sqrt", "rsqrt", "power", "tanh", "is_finite",
    )
})
# Ops that build masks and broadcast side inputs; absorbed into a group when only it reads them.
SIDE_KINDS = CHAIN_KINDS | {"stablehlo.iota", "stablehlo.constant"}
ROW_REDUCE_BODIES = frozenset({"maximum", "add", "max", "minimum"})


def _dims(value: Value) -> tuple[int, ...]:
    return tuple(sorted(d for d in value.shape if d != 1))


@dataclass(frozen=True)
class AttentionPattern:
    """One recognised attention: its forward ops, and its backward ops when the program has them.

    Attributes:
        index: position among the program's attention patterns (program order of D1).
        fwd_op_ids: ops of the forward group (D1 … D2 and the mask/broadcast ops only it reads).
        bwd_op_ids: ops of the backward group (empty when the program has no backward).
        fwd_internal: forward tensors never materialized (score-shaped ones nothing else reads).
        bwd_internal: backward tensors never materialized.
        recomputed: forward tensors the backward reads but recomputes on chip (not materialized).
        q_id, k_id, v_id, o_id: the tensors in the roles Q, K, V (as D1 and D2 read them) and O.
        do_id: dO, the cotangent of O the backward reads (None without backward).
        batch_heads: product of the batch dims of D1 (batch × heads).
        q_len, kv_len: query and key/value lengths (N is kv_len).
        head_dim, v_head_dim: d of Q/K and of V.
        causal: a mask built only from iota/compare selects the logits (a causal mask).
        masked: a mask that depends on program data selects the logits.
        bias: a data-dependent tensor is added to the logits.
        dtype: dtype of Q.
        row_inputs_bwd: row statistics the backward reads from outside it.
        paired: "" for an attention whole in this program; "forward" or "backward" for one half
            of an attention whose other half runs in another loop's body
            (tiermap/loop_pairing.py): a forward half writes the row statistics for its
            backward, a backward half recomputes the scores (`recomputed` are the program's
            inputs it does not read).
        notes: what was assumed (e.g. the Q/K roles when q_len == kv_len).
    """

    index: int
    fwd_op_ids: tuple[str, ...]
    bwd_op_ids: tuple[str, ...]
    fwd_internal: frozenset[str]
    bwd_internal: frozenset[str]
    recomputed: frozenset[str]
    q_id: str
    k_id: str
    v_id: str
    o_id: str
    do_id: str | None
    batch_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    causal: bool
    masked: bool
    bias: bool
    dtype: str
    row_inputs_bwd: frozenset[str] = frozenset()
    paired: str = ""
    notes: tuple[str, ...] = field(default=(), compare=False)

    def describe(self) -> dict[str, Any]:
        """The facts a report shows: N, query length, d, batch×heads, causal, dtype."""
        out = {"kv_len": self.kv_len, "q_len": self.q_len, "head_dim": self.head_dim,
               "v_head_dim": self.v_head_dim, "batch_heads": self.batch_heads,
               "causal": self.causal, "masked": self.masked, "bias": self.bias,
               "dtype": self.dtype, "backward": bool(self.bwd_op_ids) or self.paired == "forward"}
        if self.paired:
            out["paired"] = self.paired
        return out


class _Graph:
    """Producer/consumer indexes and constant-derivation of one program's top-level ops."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.producer: dict[str, Op] = {}
        for op in program.ops:
            for vid in op.outputs:
                self.producer[vid] = op
        self.consumers: dict[str, list[Op]] = {vid: [] for vid in program.values}
        for op in program.ops:
            for vid in dict.fromkeys(op.inputs):
                self.consumers.setdefault(vid, []).append(op)
        self.outputs = frozenset(program.outputs)
        self.const_derived: set[str] = set()
        self.iota_derived: set[str] = set()
        for op in program.ops:
            if all(v in self.const_derived for v in op.inputs):
                self.const_derived.update(op.outputs)
            if op.kind == "stablehlo.iota" or any(v in self.iota_derived for v in op.inputs):
                self.iota_derived.update(op.outputs)

    def value(self, vid: str) -> Value:
        return self.program.values[vid]


def _descendants(graph: _Graph, start: Op, stop_dots: bool = True) -> tuple[set[str], list[Op]]:
    """Chain ops reachable from `start`'s outputs (not through dots); dots reached at the edge."""
    seen: set[str] = set()
    edge_dots: list[Op] = []
    stack = list(start.outputs)
    visited_vals: set[str] = set()
    while stack:
        vid = stack.pop()
        if vid in visited_vals:
            continue
        visited_vals.add(vid)
        for op in graph.consumers.get(vid, []):
            if op.id in seen:
                continue
            if op.kind == DOT and stop_dots:
                if op not in edge_dots:
                    edge_dots.append(op)
                continue
            if op.kind not in CHAIN_KINDS:
                continue
            seen.add(op.id)
            stack.extend(op.outputs)
    return seen, edge_dots


def _ancestors_within(graph: _Graph, end: Op, allowed: set[str]) -> set[str]:
    out: set[str] = set()
    stack = list(end.inputs)
    while stack:
        vid = stack.pop()
        op = graph.producer.get(vid)
        if op is None or op.id in out or op.id not in allowed:
            continue
        out.add(op.id)
        stack.extend(op.inputs)
    return out


def _absorb_sides(graph: _Graph, group: set[str], score: Counter[int],
                  others: frozenset[str] = frozenset()) -> None:
    """Add producers of the group's inputs that build masks or broadcast side inputs.

    A producer joins when its outputs are score-shaped or derived from constants/iota only, and
    every reader is in the group or in `others` (the paired forward/backward group, which then
    recomputes the tensor on chip).
    """
    changed = True
    while changed:
        changed = False
        for oid in sorted(group, key=lambda s: int(s[2:])):
            for vid in graph.program.op(oid).inputs:
                p = graph.producer.get(vid)
                if p is None or p.id in group or p.id in others or p.kind not in SIDE_KINDS:
                    continue
                if any(vo in graph.outputs for vo in p.outputs):
                    continue
                if (p.kind == "stablehlo.constant" and "folded_from" not in p.attrs
                        and graph.value(p.outputs[0]).type.num_elements > 1):
                    continue  # a dense constant is data the kernel must read, not a splat
                readers = {c.id for vo in p.outputs for c in graph.consumers.get(vo, [])}
                if not readers <= group | others:
                    continue
                out = graph.value(p.outputs[0])
                if Counter(_dims(out)) == score or all(v in graph.const_derived
                                                       for v in p.outputs):
                    group.add(p.id)
                    changed = True


LAYOUT_KINDS = frozenset({"stablehlo.transpose", "stablehlo.reshape", "stablehlo.convert",
                          "stablehlo.copy", "stablehlo.broadcast_in_dim"})


def _absorb_layout(graph: _Graph, group: set[str]) -> None:
    """Add the layout ops (transpose, reshape, convert) that only feed the group or only read
    its outputs: a tiled kernel reads and writes its blocks in any layout, so these never make
    a pass over memory of their own."""
    changed = True
    while changed:
        changed = False
        for oid in sorted(group, key=lambda s: int(s[2:])):
            op = graph.program.op(oid)
            for vid in op.inputs:
                p = graph.producer.get(vid)
                if (p is None or p.id in group or p.kind not in LAYOUT_KINDS
                        or vid in graph.outputs or len(p.inputs) != 1 or not p.bytes_read):
                    continue  # a free op (reshape) moves nothing: the group's reader counts
                if p.kind == "stablehlo.broadcast_in_dim" and (
                        graph.value(p.inputs[0]).type.num_elements
                        != graph.value(vid).type.num_elements):
                    continue
                if all(c.id in group for c in graph.consumers.get(vid, [])):
                    group.add(p.id)
                    changed = True
            for vid in op.outputs:
                readers = graph.consumers.get(vid, [])
                if vid in graph.outputs or len(readers) != 1 or readers[0].id in group:
                    continue
                c = readers[0]
                if (c.kind in LAYOUT_KINDS and c.kind != "stablehlo.broadcast_in_dim"
                        and len(c.inputs) == 1 and c.bytes_written):
                    group.add(c.id)
                    changed = True


def _through_layout(graph: _Graph, group: set[str], vid: str) -> str:
    """The tensor a group input really is: walk back through layout ops the group absorbed."""
    while True:
        p = graph.producer.get(vid)
        if p is None or p.id not in group or p.kind not in LAYOUT_KINDS or not p.inputs:
            return vid
        vid = p.inputs[0]


def _is_score(value: Value, score: Counter[int]) -> bool:
    return Counter(_dims(value)) == score


def _is_row(value: Value, row_sigs: Iterable[Counter[int]]) -> bool:
    dims = Counter(_dims(value))
    return any(dims == sig for sig in row_sigs)


def _match_forward(graph: _Graph, d1: Op, claimed: set[str]
                   ) -> tuple[set[str], Op, bool, list[str]] | None:
    """(region op ids, D2, swapped, notes) for a D1 candidate, or None."""
    desc, edge_dots = _descendants(graph, d1)
    if not desc:
        return None
    m, n = int(d1.attrs.get("m", 0)), int(d1.attrs.get("n", 0))
    score = Counter(_dims(graph.value(d1.outputs[0])))
    d2 = None
    for dot in sorted(edge_dots, key=lambda o: o.step):
        if dot.id in claimed:
            continue
        k = int(dot.attrs.get("k", 0))
        reads_score = [v for v in dot.inputs if graph.producer.get(v) is not None
                       and (graph.producer[v].id in desc or graph.producer[v] is d1)
                       and _is_score(graph.value(v), score)]
        if len(reads_score) != 1 or k not in (m, n):
            continue
        d2 = dot
        break
    if d2 is None:
        return None
    region = _ancestors_within(graph, d2, desc)
    kinds = Counter(graph.program.op(o).kind for o in region)
    bodies = {str(graph.program.op(o).attrs.get("body", "")) for o in region
              if graph.program.op(o).kind == "stablehlo.reduce"}
    if kinds["stablehlo.exponential"] < 1 or "add" not in bodies:
        return None
    if not bodies <= ROW_REDUCE_BODIES:
        return None
    # Which operand of D1 holds the keys: the one whose free size the reductions remove.
    notes: list[str] = []
    batch = int(d1.attrs.get("batch", 1))
    reduce_out = [graph.value(graph.program.op(o).outputs[0]).type.num_elements for o in region
                  if graph.program.op(o).kind == "stablehlo.reduce"]
    swapped = False
    if m != n:
        if all(e == batch * n for e in reduce_out):
            swapped = True
        elif not all(e == batch * m for e in reduce_out):
            return None
    else:
        notes.append("query and key lengths are equal: D1's left operand taken as Q")
    kv_len = m if swapped else n
    if int(d2.attrs.get("k", 0)) != kv_len:
        return None
    return region, d2, swapped, notes


def _match_backward(graph: _Graph, fwd: set[str], score: Counter[int],
                    row_sigs: list[Counter[int]], claimed: set[str]) -> set[str]:
    """Ops of the backward of the forward group `fwd` (empty when there is none)."""
    prog = graph.program
    fwd_score = [v for oid in fwd for v in prog.op(oid).outputs
                 if _is_score(graph.value(v), score)]
    bwd: set[str] = set()
    stack: list[Op] = [c for v in fwd_score for c in graph.consumers.get(v, [])
                       if c.id not in fwd and c.id not in claimed]
    terminal: set[str] = set()
    while stack:
        op = stack.pop()
        if op.id in bwd or op.id in fwd or op.id in claimed:
            continue
        if op.kind == DOT:
            bwd.add(op.id)
            terminal.add(op.id)
            continue
        if op.kind not in CHAIN_KINDS:
            continue
        outs = [graph.value(v) for v in op.outputs]
        if not all(_is_score(o, score) or _is_row(o, row_sigs) for o in outs):
            continue
        bwd.add(op.id)
        for v in op.outputs:
            stack.extend(c for c in graph.consumers.get(v, []) if c.id not in bwd)
    if not bwd:
        return set()
    # Pull in producers of score/row-shaped inputs: dP's dot, broadcasts of row statistics.
    changed = True
    while changed:
        changed = False
        for oid in sorted(bwd, key=lambda s: int(s[2:])):
            if oid in terminal:
                continue
            for vid in prog.op(oid).inputs:
                p = graph.producer.get(vid)
                val = graph.value(vid)
                if p is None or p.id in bwd or p.id in fwd or p.id in claimed:
                    continue
                if not (_is_score(val, score) or _is_row(val, row_sigs)):
                    continue
                readers = {c.id for c in graph.consumers.get(vid, [])}
                if p.kind == DOT and _is_score(val, score):
                    bwd.add(p.id)
                    changed = True
                elif p.kind in CHAIN_KINDS and readers <= bwd:
                    bwd.add(p.id)
                    changed = True
    dots = [oid for oid in bwd if prog.op(oid).kind == DOT]
    score_dots = [oid for oid in dots if _is_score(graph.value(prog.op(oid).outputs[0]), score)]
    if len(dots) < 2 or not score_dots:
        return set()
    return bwd


def _internal(graph: _Graph, group: set[str], readers_ok: set[str]) -> frozenset[str]:
    """Outputs of `group` ops that only `readers_ok` ops read and that are not program outputs."""
    out: set[str] = set()
    for oid in group:
        for vid in graph.program.op(oid).outputs:
            if vid in graph.outputs:
                continue
            readers = {c.id for c in graph.consumers.get(vid, [])}
            if readers and readers <= readers_ok:
                out.add(vid)
    return frozenset(out)


def _data_operand(graph: _Graph, group: set[str], roles: tuple[str, ...],
                  kinds: tuple[str, ...]) -> bool:
    """Some op of these kinds combines the chain with data from outside the group (not Q, K,
    V, not a constant, not a boolean mask), seen through the layout ops the group holds."""
    for oid in group:
        op = graph.program.op(oid)
        if op.kind not in kinds:
            continue
        for vid in op.inputs:
            while True:
                p = graph.producer.get(vid)
                if (p is None or p.id not in group or p.kind not in LAYOUT_KINDS
                        or not p.inputs):
                    break
                vid = p.inputs[0]
            p = graph.producer.get(vid)
            if ((p is None or p.id not in group) and vid not in graph.const_derived
                    and graph.value(vid).dtype != "i1" and vid not in roles):
                return True
    return False


def find_attention(program: Program) -> tuple[AttentionPattern, ...]:
    """Every attention pattern of `program`'s top-level ops, in program order of D1.

    A pattern is reported only when its forward chain is complete (exp and a row sum between
    the two products, contraction of the probabilities over the key/value axis) and no
    score-shaped tensor is read outside the forward and backward groups; otherwise the ops are
    left to ordinary fusion.
    """
    graph = _Graph(program)
    claimed: set[str] = set()
    patterns: list[AttentionPattern] = []
    for d1 in program.ops:
        if d1.kind != DOT or d1.id in claimed:
            continue
        found = _match_forward(graph, d1, claimed)
        if found is None:
            continue
        region, d2, swapped, notes = found
        if region & claimed:
            continue
        score = Counter(_dims(graph.value(d1.outputs[0])))
        m, n = int(d1.attrs.get("m", 0)), int(d1.attrs.get("n", 0))
        q_len, kv_len = (n, m) if swapped else (m, n)
        row_sigs = [score - Counter([kv_len])]
        fwd = region | {d1.id, d2.id}
        bwd = _match_backward(graph, fwd, score, row_sigs, claimed | fwd)
        _absorb_sides(graph, fwd, score, frozenset(bwd))
        if bwd:
            _absorb_sides(graph, bwd, score, frozenset(fwd))
        fwd_score = {v for oid in fwd for v in program.op(oid).outputs
                     if _is_score(graph.value(v), score)}
        escaping = [v for v in fwd_score if v in graph.outputs or any(
            c.id not in fwd and c.id not in bwd for c in graph.consumers.get(v, []))]
        if escaping:
            continue
        _absorb_layout(graph, fwd)
        if bwd:
            _absorb_layout(graph, bwd)
        fwd_internal = _internal(graph, fwd - {d2.id}, fwd | bwd)
        # Row statistics the backward reads (max, sum: FlashAttention's log-sum-exp) are
        # stored; only score-shaped tensors and constant masks are recomputed.
        fwd_internal = frozenset(
            v for v in fwd_internal
            if not any(c.id in bwd for c in graph.consumers.get(v, []))
            or _is_score(graph.value(v), score) or v in graph.const_derived)
        recomputed = frozenset(v for v in fwd_internal
                               if any(c.id in bwd for c in graph.consumers.get(v, [])))
        bwd_internal = _internal(graph, bwd, bwd) if bwd else frozenset()
        q_id, k_id = (d1.inputs[1], d1.inputs[0]) if swapped else (d1.inputs[0], d1.inputs[1])
        p_side = [v for v in d2.inputs if v in fwd_score or v == d1.outputs[0]]
        v_id = next((v for v in d2.inputs if v not in p_side), d2.inputs[-1])
        q_id, k_id, v_id = (_through_layout(graph, fwd, x) for x in (q_id, k_id, v_id))
        o_id = d2.outputs[0]
        while o_id not in graph.outputs and len(graph.consumers.get(o_id, [])) == 1 and (
                graph.consumers[o_id][0].id in fwd):
            o_id = graph.consumers[o_id][0].outputs[0]
        do_id = None
        row_inputs: set[str] = set()
        if bwd:
            for oid in bwd:
                op = program.op(oid)
                ins = [_through_layout(graph, bwd, x) for x in op.inputs]
                if op.kind == DOT and v_id in ins:
                    do_id = next((x for x in ins if x != v_id), None)
                for vid in op.inputs:
                    p = graph.producer.get(vid)
                    if (p is None or p.id not in bwd) and _is_row(graph.value(vid), row_sigs):
                        row_inputs.add(vid)
        side_values = [v for oid in fwd for v in program.op(oid).inputs
                       if graph.producer.get(v) is None or graph.producer[v].id not in fwd]
        selects = [program.op(o) for o in fwd if program.op(o).kind == "stablehlo.select"]
        causal = any(program.op(o).kind == "stablehlo.iota" for o in fwd)
        masked = any(s.inputs[0] not in graph.const_derived for s in selects)
        masked = masked or any(graph.value(v).dtype == "i1" and v not in graph.const_derived
                               for v in side_values)
        roles = (q_id, k_id, v_id)
        bias = _data_operand(graph, fwd, roles, ("stablehlo.add", "stablehlo.subtract"))
        if _data_operand(graph, fwd, roles, ("stablehlo.multiply", "stablehlo.divide")):
            notes.append("the chain multiplies by data from outside (dropout or a data "
                         "scale); it is read blockwise like a mask")
        d = int(d1.attrs.get("k", 0))
        d2_m, d2_n = int(d2.attrs.get("m", 0)), int(d2.attrs.get("n", 0))
        p_is_lhs = bool(p_side) and d2.inputs[0] == p_side[0]
        dv = d2_n if p_is_lhs else d2_m
        patterns.append(AttentionPattern(
            index=len(patterns),
            fwd_op_ids=tuple(sorted(fwd, key=lambda s: int(s[2:]))),
            bwd_op_ids=tuple(sorted(bwd, key=lambda s: int(s[2:]))),
            fwd_internal=fwd_internal, bwd_internal=bwd_internal, recomputed=recomputed,
            q_id=q_id, k_id=k_id, v_id=v_id, o_id=o_id, do_id=do_id,
            batch_heads=int(d1.attrs.get("batch", 1)), q_len=q_len, kv_len=kv_len,
            head_dim=d, v_head_dim=dv, causal=causal, masked=masked, bias=bias,
            dtype=graph.value(q_id).dtype, row_inputs_bwd=frozenset(row_inputs),
            notes=tuple(notes)))
        claimed |= fwd | bwd
    return tuple(patterns)


def pattern_summary(patterns: Iterable[AttentionPattern]) -> list[Mapping[str, Any]]:
    """One dict per pattern (index plus `describe()`), for reports and tests."""
    return [{"index": p.index, **p.describe()} for p in patterns]
