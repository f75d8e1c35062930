"""The `fuse` pass: choose which ops run as one kernel, by a MIP over candidate groups.

Candidates (sets of top-level ops that could run as one kernel):

- attention: a forward from `tiermap/fusion/attention.py` and, when the program has it, its backward
  (fused together or not at all), tiled by `tiermap/fusion/tiling.py` so that the score matrix stays
  on chip;
- matmul/convolution with its epilogue: the contraction and each prefix of the chain of
  elementwise ops that alone read its result (bias add, activation), with the broadcasts that
  feed only that chain;
- elementwise clusters: connected elementwise/broadcast/reshape ops whose intermediates no op
  outside reads; a cluster that is not convex or does not fit (in an unrolled training step
  the forward's chains join the backward's that read their intermediates, across layers) is
  split into pieces joined only along tensors read within a window of steps (`_split`);
- reductions with their producers, and (a second, larger candidate) with the elementwise ops
  that read the reduced rows back, softmax-style, when whole rows fit on chip.

A fused intermediate is not materialized only if the group's working set fits one core's
on-chip budget M (`target.scratch_tier` capacity / units): the tile working set for attention
and matmuls, a streamed tile of every tensor for elementwise groups, whole rows of every
row-sized tensor where a reduced row is read back. Candidates must be convex (no path leaves the
group and comes back), so each runs as one kernel.

MIP (OR-tools MathOpt, HiGHS):

    (1) variables    x_g ∈ {0, 1} for each candidate g
    (2) constraints  Σ_{g ∋ op} x_g ≤ 1 for each op (an op runs in at most one kernel)
    (3) objective    maximise Σ_g saving_g · x_g, where saving_g = Σ_{op ∈ g} t(op alone) − t(g)

Times are the cost model's roofline times (`costmodel.roofline.op_cost` / `group_cost`) with every
tensor in the main-memory tier; only candidates with a positive saving enter. Time limit, seed and
thread count are set on every solve; the status (optimal, or feasible with its gap) is recorded in
`Fusion.notes`; without a solution the groups are chosen greedily by saving, and the notes say so.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from tiermap.costmodel.roofline import group_cost, op_cost
from tiermap.errors import TiermapError
from tiermap.fusion.attention import AttentionPattern, find_attention
from tiermap.fusion.tiling import (
    MATMUL_KINDS,
    matmul_dims,
    search_backward_tiles,
    search_forward_tiles,
    search_matmul_tiles,
    tile_budget_bytes,
    tile_fusion,
)
from tiermap.ir.fusion import Fusion, FusionGroup
from tiermap.ir.ops import ELEMENTWISE, TRANSCENDENTAL
from tiermap.ir.program import DTYPE_BITS, Op, Program
from tiermap.ir.untaken import Untaken
from tiermap.mathopt import WorkBudget, guard_fired, load_mathopt, solve_parameters

if TYPE_CHECKING:
    from tiermap.hardware.target import Target
    from tiermap.passes.base import PipelineState

# Ops that fuse as loop bodies: elementwise math, and movement a kernel does by indexing.
FUSIBLE_KINDS = frozenset(
    {"stablehlo." + k for k in ELEMENTWISE | TRANSCENDENTAL}
    | {"stablehlo." + k for k in ("broadcast_in_dim", "broadcast", "reshape", "transpose",
                                  "iota", "copy")})
REDUCE_KIND = "stablehlo.reduce"
BROADCAST_LIKE = frozenset({"stablehlo.broadcast_in_dim", "stablehlo.broadcast",
                            "stablehlo.reshape", "stablehlo.convert", "stablehlo.transpose"})
STREAM_TILE_ELEMS = 1024  # elements per tensor an elementwise kernel keeps on chip at once
MAX_EPILOGUE_OPS = 8


@dataclass(frozen=True)
class Candidate:
    """A possible fusion group with what it saves (seconds) under the cost model."""

    key: str
    kind: str
    op_ids: frozenset[str]
    internal: frozenset[str]
    reads_per_input: Mapping[str, float]
    working_set_bytes: int
    saving_s: float
    attrs: Mapping[str, Any]
    partner: str | None = None
    # Always chosen: half of an attention paired across loops, whose residuals are not stored.
    pinned: bool = False


def _splat(op: Op, program: Program) -> bool:
    """A constant a kernel can generate on chip: a scalar or a folded broadcast of one."""
    if op.kind != "stablehlo.constant":
        return False
    return ("folded_from" in op.attrs
            or all(program.values[v].type.num_elements <= 1 for v in op.outputs))


def _elem_bytes(dtype: str) -> float:
    return DTYPE_BITS.get(dtype, 32) / 8.0


class _Index:
    """Producer and consumer maps of a program's top-level ops."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.producer: dict[str, Op] = {v: op for op in program.ops for v in op.outputs}
        self.readers: dict[str, list[Op]] = {vid: [] for vid in program.values}
        for op in program.ops:
            for vid in dict.fromkeys(op.inputs):
                self.readers.setdefault(vid, []).append(op)
        self.outputs = frozenset(program.outputs)

    def internal(self, op_ids: frozenset[str]) -> frozenset[str]:
        """Outputs of the group that only the group reads (and that the program does not return)."""
        out = set()
        for oid in op_ids:
            for vid in self.program.op(oid).outputs:
                readers = self.readers.get(vid, [])
                if vid not in self.outputs and readers and all(r.id in op_ids for r in readers):
                    out.add(vid)
        return frozenset(out)

    def convex(self, op_ids: frozenset[str]) -> bool:
        """No path leaves the group and re-enters it."""
        last = max(self.program.op(o).step for o in op_ids)
        stack = [r for oid in op_ids for v in self.program.op(oid).outputs
                 for r in self.readers.get(v, []) if r.id not in op_ids and r.step < last]
        seen: set[str] = set()
        while stack:
            op = stack.pop()
            if op.id in seen:
                continue
            seen.add(op.id)
            for v in op.outputs:
                for r in self.readers.get(v, []):
                    if r.id in op_ids:
                        return False
                    if r.step < last and r.id not in seen:
                        stack.append(r)
        return True


def _alone_s(program: Program, target: Target, op: Op, main: str) -> float:
    return op_cost(op, program, target, [main] * len(op.inputs), [main] * len(op.outputs)).time_s


def _fused_s(program: Program, target: Target, group: FusionGroup, main: str) -> float:
    tier_of = {v: main for oid in group.op_ids for op in (program.op(oid),)
               for v in (*op.inputs, *op.outputs)}
    return group_cost(group, program, target, tier_of).time_s


# --- candidates ---------------------------------------------------------------------------------


def _attention_candidates(program: Program, target: Target, patterns: Iterable[AttentionPattern],
                          fast_bytes: int, tier: str) -> tuple[list[FusionGroup], list[str]]:
    """Forward (and backward) groups for every pattern whose tiles fit; notes for those that
    do not."""
    groups: list[FusionGroup] = []
    notes: list[str] = []
    for p in patterns:
        e = _elem_bytes(p.dtype)
        try:
            if p.fwd_op_ids:
                search_forward_tiles(p.q_len, p.kv_len, p.head_dim, p.v_head_dim, fast_bytes, e,
                                     p.causal)
            if p.bwd_op_ids:
                search_backward_tiles(p.q_len, p.kv_len, p.head_dim, p.v_head_dim, fast_bytes,
                                      e, p.causal)
        except TiermapError as exc:
            if p.paired:
                raise TiermapError(
                    f"attention {p.index}: the {p.paired} half of an attention paired across "
                    f"two loops fits no tile ({exc}); its residuals are not stored, so it must "
                    "run tiled; fix: a target with more on-chip memory per core") from exc
            notes.append(f"attention {p.index} left unfused: {exc}")
            continue
        base: dict[str, Any] = {**p.describe(), "pattern": p.index, "q": p.q_id, "k": p.k_id,
                                "v": p.v_id, "o": p.o_id}
        if p.fwd_op_ids:
            groups.append(FusionGroup(id=f"attn{p.index}", kind="attention",
                                      op_ids=p.fwd_op_ids, internal=p.fwd_internal, attrs=base))
        if p.bwd_op_ids:
            battrs = {**base, "do": p.do_id, "row_inputs": tuple(sorted(p.row_inputs_bwd)),
                      "recomputed": tuple(sorted(p.recomputed))}
            groups.append(FusionGroup(id=f"attn{p.index}_bwd", kind="attention_bwd",
                                      op_ids=p.bwd_op_ids, internal=p.bwd_internal,
                                      attrs=battrs))
    return groups, notes


def _matmul_working_set(op: Op, extra_tiles: int, fast_bytes: int) -> int | None:
    """Bytes of the best matmul tile leaving room for `extra_tiles` more Tm × Tn tiles (full-size
    epilogue operands such as a residual; intermediates of the epilogue live in registers)."""
    batch, m, n, k = matmul_dims(dict(op.attrs), op.kind)
    e = _elem_bytes(op.dtype)
    budget = fast_bytes / (1 + extra_tiles)
    try:
        tiles = search_matmul_tiles(m, n, k, budget, e, batch)
    except TiermapError:
        return None
    return tiles.working_set_bytes + int(extra_tiles * tiles.tile_m * tiles.tile_n * e)


def _matmul_candidates(index: _Index, taken: set[str], fast_bytes: int,
                       clusters: list[frozenset[str]]
                       ) -> list[tuple[str, frozenset[str], int, dict[str, Any]]]:
    """(kind, ops, working set bytes) for each contraction with its epilogue: each prefix of the
    chain of single readers of its result, and the whole elementwise cluster that alone reads
    its result (bias add and a multi-op activation such as GELU)."""
    program = index.program
    out: list[tuple[str, frozenset[str], int, dict[str, Any]]] = []
    cluster_of = {oid: c for c in clusters for oid in c}
    for op in program.ops:
        if op.kind not in MATMUL_KINDS or op.id in taken:
            continue
        ops = {op.id}
        cur = op.outputs[0]
        out_elems = program.values[cur].type.num_elements
        extra_tiles = 0
        for _ in range(MAX_EPILOGUE_OPS):
            readers = index.readers.get(cur, [])
            if cur in index.outputs or len(readers) != 1:
                break
            nxt = readers[0]
            if nxt.kind not in FUSIBLE_KINDS or nxt.id in taken or nxt.id in ops:
                break
            ops.add(nxt.id)
            for vid in nxt.inputs:
                if vid == cur:
                    continue
                p = index.producer.get(vid)
                if (p is not None and (p.kind in BROADCAST_LIKE or _splat(p, program))
                        and p.id not in taken
                        and all(r.id in ops for r in index.readers.get(vid, []))):
                    ops.add(p.id)
                    if not p.inputs:
                        continue
                    vid = p.inputs[0]
                if program.values[vid].type.num_elements >= out_elems:
                    extra_tiles += 1  # a full-size operand (a residual) needs its own tile
            cur = nxt.outputs[0]
            ws = _matmul_working_set(op, extra_tiles, fast_bytes)
            if ws is None:
                break
            out.append(("matmul", frozenset(ops), ws, {"epilogue_tiles": extra_tiles}))
        readers = index.readers.get(op.outputs[0], [])
        owners = {cluster_of.get(r.id) for r in readers}
        if op.outputs[0] in index.outputs or len(owners) != 1 or None in owners:
            continue
        cluster = next(iter(owners))
        assert cluster is not None
        produced = {v for oid in cluster for v in program.op(oid).outputs}
        external = {v for oid in cluster for v in program.op(oid).inputs
                    if v not in produced and v != op.outputs[0]}
        extra = sum(1 for v in external if program.values[v].type.num_elements >= out_elems)
        ws = _matmul_working_set(op, extra, fast_bytes)
        if ws is not None:
            out.append(("matmul", frozenset(cluster | {op.id}), ws, {"epilogue_tiles": extra}))
    return out


def _find(parent: dict[str, str], x: str) -> str:
    """Union-find root of `x`, halving the path on the way."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def _clusters(index: _Index, taken: set[str], through_reduce: bool) -> list[frozenset[str]]:
    """Connected fusible ops joined along tensors that only fusible ops read."""
    program = index.program
    member = [op for op in program.ops if op.id not in taken
              and (op.kind in FUSIBLE_KINDS or op.kind == REDUCE_KIND or _splat(op, program))]
    ids = {op.id for op in member}
    parent = {oid: oid for oid in ids}
    for op in member:
        for vid in op.inputs:
            p = index.producer.get(vid)
            if p is None or p.id not in ids or vid in index.outputs:
                continue
            if p.kind == REDUCE_KIND and not through_reduce:
                continue
            if not all(r.id in ids for r in index.readers.get(vid, [])):
                continue
            parent[_find(parent, op.id)] = _find(parent, p.id)
    comps: dict[str, set[str]] = {}
    for op in member:  # program order, so the candidates' order does not depend on hashing
        comps.setdefault(_find(parent, op.id), set()).add(op.id)
    return [frozenset(c) for c in comps.values() if len(c) > 1]


def _fits(index: _Index, ops: frozenset[str], fast_bytes: int) -> bool:
    return _cluster_working_set(index, ops)[0] <= fast_bytes and index.convex(ops)


def _split(index: _Index, ops: frozenset[str], fast_bytes: int, through_reduce: bool
           ) -> list[frozenset[str]]:
    """Convex pieces that fit on chip of a cluster that is not convex or does not fit.

    In an unrolled training step one cluster can join a layer's forward chain to the backward
    ops that read its intermediates far later, and so grow across layers. The cluster is re-cut
    with an edge from a tensor's producer to a reader only where the reader comes at most
    `window` steps after the producer; a piece that still fails is re-cut with half the window.
    A tensor read beyond the window is materialized (the group's `internal` leaves it out)."""
    program = index.program
    steps = {oid: program.op(oid).step for oid in ops}
    edges: list[tuple[int, str, str]] = []  # (span in steps, producer, reader)
    for oid in sorted(ops, key=steps.__getitem__):
        for vid in dict.fromkeys(program.op(oid).inputs):
            p = index.producer.get(vid)
            if p is None or p.id not in ops or p.id == oid or vid in index.outputs:
                continue
            if p.kind == REDUCE_KIND and not through_reduce:
                continue
            edges.append((steps[oid] - steps[p.id], p.id, oid))
    out: list[frozenset[str]] = []
    work = [(ops, max((e[0] for e in edges), default=0) // 2)]
    while work:
        piece, window = work.pop()
        parent = {oid: oid for oid in piece}
        for span, a, b in edges:
            if span <= window and a in parent and b in parent:
                parent[_find(parent, b)] = _find(parent, a)
        comps: dict[str, set[str]] = {}
        for oid in sorted(piece, key=steps.__getitem__):
            comps.setdefault(_find(parent, oid), set()).add(oid)
        for comp in map(frozenset, comps.values()):
            if len(comp) < 2:
                continue
            if _fits(index, comp, fast_bytes):
                out.append(comp)
            elif window > 0:
                work.append((comp, window // 2))
    return sorted(out, key=lambda c: min(steps[o] for o in c))


def _cluster_working_set(index: _Index, ops: frozenset[str]) -> tuple[int, str]:
    """(bytes, kind) of an elementwise/reduction cluster's on-chip working set."""
    program = index.program
    tensors = {v for oid in ops for op in (program.op(oid),) for v in (*op.inputs, *op.outputs)}
    values = [program.values[v] for v in tensors if v in program.values]
    reduces = [program.op(o) for o in ops if program.op(o).kind == REDUCE_KIND]
    rows = 0
    for r in reduces:
        out = r.outputs[0]
        if any(reader.id in ops for reader in index.readers.get(out, [])):
            rows = max(rows, program.values[out].type.num_elements)
    kind = "reduction" if reduces else "elementwise"
    if rows:
        # Whole rows stay on chip: one row of every tensor (a reduced row is one element).
        per_row = sum(_elem_bytes(v.dtype) * max(1, -(-v.type.num_elements // rows))
                      for v in values)
        return int(per_row), kind
    tile = sum(_elem_bytes(v.dtype) * min(STREAM_TILE_ELEMS, max(1, v.type.num_elements))
               for v in values)
    return int(tile), kind


def candidates(program: Program, target: Target, attention: bool = True,
               untaken: Untaken | None = None) -> tuple[list[Candidate], list[str]]:
    """Every feasible, convex candidate with a positive saving, and notes on what was dropped.

    `attention=False` leaves attention to ordinary fusion (softmax as a row kernel, the score
    matrix materialized between the products): "standard attention", for comparison; `untaken`
    does the same for the attentions whose output it names (the applied program leaves them to
    XLA; tiermap/ir/untaken.py)."""
    index = _Index(program)
    main = target.main_tier.name
    fast_bytes, tier = tile_budget_bytes(target)
    notes: list[str] = []
    out: list[Candidate] = []
    patterns = find_attention(program) if attention else ()
    if untaken:
        kept = tuple(p for p in patterns if untaken.fuses_attention(program.name, p.o_id))
        notes.extend(f"attention with output {p.o_id}: fused as ordinary chains, not as "
                     "attention: the applied program leaves it to XLA (planned as it runs)"
                     for p in patterns if p not in kept)
        patterns = kept
    if program.paired_attention:  # halves of attentions split across loops: always recognised
        claimed = {o for p in program.paired_attention for o in p.fwd_op_ids + p.bwd_op_ids}
        own = [p for p in patterns if not claimed & set(p.fwd_op_ids + p.bwd_op_ids)]
        patterns = tuple(replace(p, index=i) for i, p in enumerate(
            [*own, *program.paired_attention]))
    attn_groups, attn_notes = _attention_candidates(program, target, patterns, fast_bytes, tier)
    notes.extend(attn_notes)
    tiled = tile_fusion(program, target, Fusion(groups=tuple(attn_groups))).groups
    by_pattern: dict[int, list[FusionGroup]] = {}
    for g in tiled:
        by_pattern.setdefault(int(g.attrs["pattern"]), []).append(g)
    taken: set[str] = set()
    for index_p, gs in sorted(by_pattern.items()):
        alone = sum(_alone_s(program, target, program.op(o), main) for g in gs for o in g.op_ids)
        fused = sum(_fused_s(program, target, g, main) for g in gs)
        for g in gs:
            taken.update(g.op_ids)
        paired = any(g.attrs.get("paired") for g in gs)
        if alone - fused <= 0 and not paired:
            notes.append(f"attention {index_p}: fusing saves nothing under the cost model")
            continue
        keys = [g.id for g in gs]
        for g in gs:
            share = (alone - fused) if g is gs[0] else 0.0
            out.append(Candidate(g.id, g.kind, frozenset(g.op_ids), g.internal,
                                 dict(g.reads_per_input), g.working_set_bytes, share,
                                 dict(g.attrs), next((k for k in keys if k != g.id), None),
                                 pinned=paired))
    raw: list[tuple[str, frozenset[str], int, dict[str, Any]]] = []
    seen: set[frozenset[str]] = set()
    pass_clusters = _clusters(index, taken, through_reduce=False)
    raw.extend(_matmul_candidates(index, taken, fast_bytes, pass_clusters))
    for through_reduce, clusters in ((False, pass_clusters),
                                     (True, _clusters(index, taken, through_reduce=True))):
        for cluster in clusters:
            pieces = ([cluster] if _fits(index, cluster, fast_bytes)
                      else _split(index, cluster, fast_bytes, through_reduce))
            for ops in pieces:
                if ops in seen:
                    continue
                seen.add(ops)
                ws, kind = _cluster_working_set(index, ops)
                raw.append((kind, ops, ws, {}))
    for n, (kind, ops, ws, attrs) in enumerate(raw):
        if ws > fast_bytes:
            continue
        if not index.convex(ops):
            continue
        internal = index.internal(ops)
        group = FusionGroup(id=f"c{n}", kind=kind, op_ids=tuple(sorted(
            ops, key=lambda o: program.op(o).step)), internal=internal, working_set_bytes=ws)
        saving = (sum(_alone_s(program, target, program.op(o), main) for o in ops)
                  - _fused_s(program, target, group, main))
        if saving <= 0:
            continue
        out.append(Candidate(f"c{n}", kind, ops, internal, {}, ws, saving, attrs))
    return out, notes


# --- the MIP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which candidates the solver chose and how (status: optimal | feasible | greedy)."""

    chosen: tuple[str, ...]
    status: str
    objective_s: float
    bound_s: float | None
    wall_s: float
    detail: str = ""
    guard_fired: bool = False  # stopped by the wall-clock guard, not the node limit


# The fusion MIP (set packing, solved at its root on every program measured: 1 node for the
# 12-layer training step's 6449 candidates) stops at this many branch-and-bound nodes, a
# deterministic limit; its time limit is a wall-clock guard behind it.
FUSE_NODE_LIMIT = 200


def _greedy(cands: list[Candidate]) -> list[str]:
    chosen: list[str] = []
    used: set[str] = set()
    by_key = {c.key: c for c in cands}
    for c in sorted(cands, key=lambda c: (not c.pinned, -c.saving_s)):
        if c.key in chosen:
            continue
        pair = [c] + ([by_key[c.partner]] if c.partner in by_key else [])
        ops = set().union(*(p.op_ids for p in pair))
        if ops & used:
            continue
        used |= ops
        chosen.extend(p.key for p in pair)
    return chosen


def select(cands: list[Candidate], guard_s: float, seed: int, workers: int) -> Selection:
    """Solve the set-packing MIP of the module docstring (FUSE_NODE_LIMIT nodes, `guard_s`
    seconds of wall-clock guard; HiGHS runs one thread whatever `workers` says)."""
    t0 = time.perf_counter()
    if not cands:
        return Selection((), "optimal", 0.0, 0.0, 0.0, "no candidates")
    try:
        mo = load_mathopt()
    except ImportError as exc:  # pragma: no cover - ortools is a dependency
        chosen = _greedy(cands)
        return Selection(tuple(chosen), "greedy", _value(cands, chosen), None,
                         time.perf_counter() - t0, f"OR-tools unavailable: {exc}")
    scale = max(max(c.saving_s for c in cands), 1e-30)
    model = mo.Model(name="fuse")
    # (1) variables
    x = {c.key: model.add_binary_variable(name=c.key) for c in cands}
    # (2) constraints: an op in at most one group; an attention forward with its backward
    by_op: dict[str, list[str]] = {}
    for c in cands:
        for oid in c.op_ids:
            by_op.setdefault(oid, []).append(c.key)
    for oid, keys in by_op.items():
        if len(keys) > 1:
            model.add_linear_constraint(mo.fast_sum(x[k] for k in keys) <= 1, name=oid)
    for c in cands:
        if c.partner is not None and c.partner in x and c.key < c.partner:
            model.add_linear_constraint(x[c.key] - x[c.partner] == 0)
        if c.pinned:
            model.add_linear_constraint(x[c.key] == 1, name=f"pinned_{c.key}")
    # (3) objective (savings scaled to about 1 for the solver's tolerances)
    model.maximize(mo.fast_sum((c.saving_s / scale) * x[c.key] for c in cands))
    params = solve_parameters("highs", seed, workers, WorkBudget(FUSE_NODE_LIMIT, 0.0, guard_s))
    result = mo.solve(model, mo.SolverType.HIGHS, params=params)
    fired = guard_fired(result)
    reason = result.termination.reason
    wall_s = time.perf_counter() - t0
    if not result.has_primal_feasible_solution():
        chosen = _greedy(cands)
        return Selection(tuple(chosen), "greedy", _value(cands, chosen), None, wall_s,
                         f"HiGHS ended {reason.name.lower()} without a solution", fired)
    values = result.variable_values()
    chosen = [c.key for c in cands if values[x[c.key]] > 0.5]
    bound = result.termination.objective_bounds.dual_bound
    status = "optimal" if reason == mo.TerminationReason.OPTIMAL else "feasible"
    return Selection(tuple(chosen), status, _value(cands, chosen),
                     bound * scale if bound == bound and abs(bound) != float("inf") else None,
                     wall_s, f"HiGHS {reason.name.lower()}", fired)


def _backward_note(group: FusionGroup) -> str:
    if group.attrs.get("paired") == "forward":
        return ", its backward in the paired loop (the scores recomputed there, not stored)"
    return ", with backward " + group.id + "_bwd" if group.attrs["backward"] else ""


def _value(cands: list[Candidate], chosen: Iterable[str]) -> float:
    keys = set(chosen)
    return sum(c.saving_s for c in cands if c.key in keys)


def fuse(program: Program, target: Target, time_limit_s: float = 10.0, seed: int = 0,
         workers: int = 1, attention: bool = True, guard_s: float | None = None,
         untaken: Untaken | None = None) -> Fusion:
    """Fusion groups for `program` on `target` (module docstring), with tiles chosen.

    The MIP stops at FUSE_NODE_LIMIT nodes; `guard_s` (default `time_limit_s`, less under a
    planning deadline) is its wall-clock guard. `attention=False` skips attention recognition
    (see `candidates`), `untaken` the attentions the applied program leaves to XLA."""
    cands, notes = candidates(program, target, attention, untaken)
    guard = float(time_limit_s) if guard_s is None else guard_s
    sel = select(cands, guard, seed, workers)
    chosen = set(sel.chosen)
    groups: list[FusionGroup] = []
    counters: dict[str, int] = {}
    for c in sorted((c for c in cands if c.key in chosen),
                    key=lambda c: min(program.op(o).step for o in c.op_ids)):
        op_ids = tuple(sorted(c.op_ids, key=lambda o: program.op(o).step))
        if c.kind.startswith("attention"):
            gid = c.key
        else:
            prefix = {"matmul": "mm", "elementwise": "ew", "reduction": "red"}[c.kind]
            counters[prefix] = counters.get(prefix, 0) + 1
            gid = f"{prefix}{counters[prefix] - 1}"
        groups.append(FusionGroup(id=gid, kind=c.kind, op_ids=op_ids, internal=c.internal,
                                  reads_per_input=dict(c.reads_per_input),
                                  working_set_bytes=c.working_set_bytes, attrs=dict(c.attrs)))
    gap = ""
    if sel.bound_s is not None and sel.objective_s > 0 and sel.status == "feasible":
        gap = f", gap {max(sel.bound_s - sel.objective_s, 0.0) / sel.objective_s:.3g}"
    for g in groups:
        if g.kind == "attention":
            a = g.attrs
            notes.append(
                f"{g.id}: attention N={a['kv_len']} (keys), queries {a['q_len']}, "
                f"d={a['head_dim']}, batch×heads={a['batch_heads']}, "
                f"{'causal' if a['causal'] else 'not causal'}"
                f"{', masked' if a['masked'] else ''}{', bias' if a['bias'] else ''}, "
                f"{a['dtype']}{_backward_note(g)}")
        elif g.kind == "attention_bwd" and g.attrs.get("paired") == "backward":
            notes.append(f"{g.id}: backward of an attention whose forward runs in the paired "
                         f"loop; it recomputes the scores (inputs "
                         f"{', '.join(g.attrs.get('recomputed', ())) or 'none'} not read)")
    notes.insert(0, f"fuse: {len(cands)} candidates, {len(groups)} groups chosen; solver "
                    f"{sel.detail}, status {sel.status}{gap}; saving {sel.objective_s:.4g} s "
                    f"(node limit {FUSE_NODE_LIMIT}, time limit {time_limit_s} s, seed {seed}, "
                    "1 thread)")
    warnings = (f"fuse: the fusion MIP stopped at its wall-clock guard ({guard:.3g} s) before "
                f"its node limit, so the fusion groups can differ on a faster machine (a longer "
                "time limit avoids it)",) if sel.guard_fired else ()
    return tile_fusion(program, target, Fusion(groups=tuple(groups), notes=tuple(notes),
                                               warnings=warnings))


# Under a planning deadline the fusion MIP gets this share of the whole planning time (see
# `compiler.pipeline.fusion_passes`), and never more than LEFT_SHARE of the time left when it
# starts (placement, which comes after, needs the rest).
DEADLINE_SHARE = 0.2
LEFT_SHARE = 0.5


@dataclass(frozen=True)
class FusePass:
    """Choose fusion groups (attention, matmul epilogues, elementwise and reduction chains).

    Options: the MIP's `time_limit_s` (under a deadline in the state, at most LEFT_SHARE of the
    time left; `fusion_passes` gives it DEADLINE_SHARE of the whole planning time, so that the
    limit the notes record does not depend on timing unless the deadline binds), `seed` and
    `workers`; `attention=False` fuses attention only as ordinary chains (a "standard
    attention" baseline).

    Requires: a Program and a Target. Ensures: `state.fusion` holds disjoint, convex groups whose
    working sets fit one core's on-chip budget, with attention tiled (`Fusion.tiles`), and
    `Fusion.notes` records the solver's status.
    """

    name: ClassVar[str] = "fuse"
    time_limit_s: float = 10.0
    seed: int = 0
    workers: int = 1
    attention: bool = True

    def run(self, state: PipelineState) -> PipelineState:
        fusion = fuse(state.program, state.target, self.time_limit_s, self.seed,
                      self.workers, self.attention, guard_s=self.solver_time_limit_s(state),
                      untaken=state.untaken)
        return replace(state, fusion=fusion)

    def solver_time_limit_s(self, state: PipelineState) -> float:
        """The MIP's wall-clock guard: `time_limit_s`, or less when the state's deadline leaves
        less: at most LEFT_SHARE of the time left."""
        left_s = state.seconds_left()
        if left_s is None:
            return float(self.time_limit_s)
        return max(min(float(self.time_limit_s), LEFT_SHARE * left_s), 0.01)
