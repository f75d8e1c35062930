"""The "naive" and "greedy" strategies, in segment form (see placement/problem.py's docstring)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tiermap.errors import InfeasiblePlacementError
from tiermap.placement.cost_state import CostState
from tiermap.placement.problem import PlacementProblem
from tiermap.placement.segments import RELIEVE_CANDIDATES, Assignment, Choice, Segments

# --- naive ---------------------------------------------------------------------------------------


def _program_order(problem: PlacementProblem) -> list[str]:
    order = {vid: i for i, vid in enumerate(problem.program.values)}
    return sorted(problem.segments, key=lambda v: (problem.segments[v].first, order[v]))


def _spill_order(problem: PlacementProblem, seg: Segments) -> list[tuple[int, bool]]:
    """Tiers to try for a whole tensor: main, then slower ones (homes included), then faster."""
    t = problem.main
    cands = sorted([(k, False) for k in seg.tiers] + [(k, True) for k in seg.homes])
    slower = [c for c in cands if c[0] >= t]
    faster = [c for c in cands if c[0] < t][::-1]
    return slower + faster


def naive_assignment(problem: PlacementProblem, start: Mapping[str, Choice] | None = None
                     ) -> Assignment:
    """Whole tensors in main memory, in program order, spilling to slower tiers when full.

    Tensors already in `start` (pinned ones) keep their choice.

    Raises:
        InfeasiblePlacementError: some tensor fits no tier over its whole live range.
    """
    occ = problem.reserved.copy()  # a loop body's bytes while it runs
    out: Assignment = {}
    for vid, choice in (start or {}).items():
        seg = problem.segments[vid]
        out[vid] = choice
        for k, lo, hi in problem.layout(seg, choice)[0]:
            occ[k, lo:hi + 1] += seg.nbytes
    for vid in _program_order(problem):
        if vid in out:
            continue
        seg = problem.segments[vid]
        # tensors tied by alias ops go whole into one writable tier together
        group = [problem.segments[v] for v in problem.tie_group(vid) if v not in out]
        lo, hi = min(m.first for m in group), max(m.last for m in group)
        need = np.zeros(hi - lo + 2, dtype=np.int64)
        for member in group:
            need[member.first - lo] += member.nbytes
            need[member.last + 1 - lo] -= member.nbytes
        need = np.cumsum(need[:-1])
        for k, home in _spill_order(problem, seg):
            if len(group) > 1 and (home or any(k not in m.tiers for m in group)):
                continue
            if (occ[k, lo:hi + 1] + need).max(initial=0) <= problem.capacity[k]:
                occ[k, lo:hi + 1] += need
                for member in group:
                    out[member.vid] = Choice.whole(member, k, home)
                break
        else:
            tiers = [k for k, _ in _spill_order(problem, seg)]
            used = [int(occ[k, seg.first:seg.last + 1].max(initial=0)) for k in tiers]
            free = ", ".join(
                f"{problem.tier_names[k]} {int(problem.capacity[k]) - u} of "
                f"{int(problem.capacity[k])} B free" for k, u in zip(tiers, used, strict=True))
            value = problem.program.values[vid]
            tied = "" if len(group) == 1 else (
                f" together with the {len(group) - 1} tensor(s) alias ops tie to it ("
                + ", ".join(m.vid for m in group[1:4]) + ("..." if len(group) > 4 else "") + ")")
            raise InfeasiblePlacementError(
                f"tensor {vid} ({value.type}, {seg.nbytes} bytes, live at steps {seg.first}.."
                f"{seg.last}) fits no tier over its live range{tied} when tensors are placed "
                f"whole in program order ({free}). Fix: a target with more memory, or strategy "
                "'greedy' or 'mip', which split live ranges")
    return out


# --- greedy --------------------------------------------------------------------------------------


def _idle_spill(problem: PlacementProblem) -> Assignment | None:
    """Everything in main memory, then evict the longest idle gaps where a tier overflows.

    Returns None when this cannot relieve the pressure (the caller keeps the naive-style spill).
    """
    p = problem
    assignment: Assignment = dict(p.pinned)
    for vid in _program_order(p):
        if vid in assignment:
            continue
        seg = p.segments[vid]
        if p.main in seg.tiers:
            assignment[vid] = Choice.whole(seg, p.main)
        else:
            # a tied tensor may not take a read-only home: its ties need one writable tier
            spill = [(k, home) for k, home in _spill_order(p, seg)
                     if not (home and len(p.tie_group(vid)) > 1)]
            if not spill:
                return None
            assignment[vid] = Choice.whole(seg, spill[0][0], spill[0][1])
    state = CostState(p, assignment)
    index = _LiveIndex.of(p)
    for tier in p.writable:
        slower = [k for k in p.writable + p.homes if k > tier]
        guard = 0
        while True:
            over = state.occ[tier] - p.capacity[tier]
            if over.max(initial=0) <= 0:
                break
            guard += 1
            if guard > 4 * len(p.segments) + 16:
                return None
            step = int(np.argmax(over))
            if not _relieve(state, tier, step, slower, int(over[step]), index):
                return None
    return dict(state.assignment)


@dataclass(frozen=True)
class _LiveIndex:
    """Tensors and gaps by step range, for finding those live at a step quickly.

    `gap_*` arrays list every gap of every tensor, longest (then largest) first.
    """

    vids: tuple[str, ...]
    first: np.ndarray
    last: np.ndarray
    density_order: np.ndarray  # tensor indices by bytes accessed per byte held, ascending
    gap_owner: np.ndarray
    gap_index: np.ndarray
    gap_lo: np.ndarray
    gap_hi: np.ndarray

    @staticmethod
    def of(problem: PlacementProblem) -> _LiveIndex:
        vids = tuple(problem.segments)
        segs = [problem.segments[v] for v in vids]
        density = np.array([sum(b for _j, _s, b, _r in problem.touches.get(v, ()))
                            / max(problem.segments[v].nbytes, 1) for v in vids])
        first = np.array([s.first for s in segs], dtype=np.int64)
        rows = [(-g.num_steps, -s.nbytes, i, gi, g.lo, g.hi)
                for i, s in enumerate(segs) for gi, g in enumerate(s.gaps)]
        rows.sort()
        cols = np.array(rows, dtype=np.int64).reshape(-1, 6)
        return _LiveIndex(vids, first, np.array([s.last for s in segs], dtype=np.int64),
                          np.lexsort((-first, density)), cols[:, 2], cols[:, 3], cols[:, 4],
                          cols[:, 5])

    def gaps_at(self, step: int) -> Iterator[tuple[str, int]]:
        """(tensor, gap index) of the gaps that hold `step`, longest first."""
        for i in np.flatnonzero((self.gap_lo <= step) & (self.gap_hi >= step)).tolist():
            yield self.vids[int(self.gap_owner[i])], int(self.gap_index[i])

    def tensors_at(self, step: int) -> Iterator[str]:
        """Tensors live at `step`, fewest bytes accessed per byte held first."""
        order = self.density_order
        live = (self.first[order] <= step) & (self.last[order] >= step)
        for i in order[live].tolist():
            yield self.vids[int(i)]


def _relieve(state: CostState, tier: int, step: int, slower: Sequence[int], over_bytes: int,
             index: _LiveIndex) -> bool:
    """Move one tensor (part) out of `tier` at `step`, the one that costs least per byte freed.

    Candidates: the idle gaps there, longest first (evicted to the next slower tier that takes
    them, with the prefetch back before the next use), then whole tensors with the fewest bytes
    accessed per byte held.
    """
    p = state.p
    options: list[tuple[str, Choice]] = []
    for vid, g in index.gaps_at(step):
        if len(options) >= RELIEVE_CANDIDATES:
            break
        choice = state.assignment[vid]
        if choice.gaps[g] != tier:
            continue
        seg = p.segments[vid]
        for k in slower:
            if k not in seg.tiers and k not in seg.homes:
                continue
            if p.read_only[k] and choice.home not in (None, k):
                continue
            new_gaps = list(choice.gaps)
            new_gaps[g] = k
            new = Choice(choice.runs, tuple(new_gaps), k if p.read_only[k] else choice.home)
            if p.valid(seg, new) and not any(
                    kk == tier and lo <= step <= hi for kk, lo, hi in p.layout(seg, new)[0]):
                options.append((vid, new))
                break
    wholes = 0
    for vid in index.tensors_at(step):
        if wholes >= RELIEVE_CANDIDATES // 2:
            break
        choice = state.assignment[vid]
        if tier not in choice.runs and tier not in choice.gaps:
            continue
        seg = p.segments[vid]
        for k in slower:
            if k in seg.tiers or k in seg.homes:
                options.append((vid, Choice.whole(seg, k, p.read_only[k])))
                wholes += 1
                break
    best: tuple[float, int] | None = None
    for i, (vid, new) in enumerate(options):
        fits, d_time = state.probe(vid, new, ignore_tier=tier)
        if not fits:
            continue
        freed = min(p.segments[vid].nbytes, over_bytes) or 1
        score = d_time / freed
        if best is None or score < best[0]:
            best = (score, i)
    if best is None:
        return False
    vid, new = options[best[1]]
    state.force(vid, new)
    return True


def _benefit(problem: PlacementProblem, vid: str, choice: Choice, tier: int) -> float:
    """Seconds saved by accessing `vid` in `tier` instead of where `choice` puts it, / √size."""
    p = problem
    seg = p.segments[vid]
    saved_s = 0.0
    for _j, step, b, is_read in p.touches.get(vid, ()):
        k = choice.runs[seg.run_of_step[step]]
        bw = p.read_bw if is_read else p.write_bw
        saved_s += b / bw[k] - b / bw[tier]
    return saved_s / math.sqrt(max(seg.nbytes, 1))


def _candidates(problem: PlacementProblem, seg: Segments, choice: Choice, tier: int
                ) -> list[Choice]:
    """Ways to bring `seg` into `tier`: whole, then run by run (a prefetch before, as early as
    the window options allow, and an eviction after), then across a gap between two runs there.
    """
    p = problem
    out: list[Choice] = []
    if tier not in seg.tiers:
        return out
    out.append(Choice.whole(seg, tier))
    for r in range(len(seg.runs)):
        if choice.runs[r] == tier:
            continue
        runs = list(choice.runs)
        runs[r] = tier
        gaps = list(choice.gaps)
        if not p.valid(seg, Choice(tuple(runs), tuple(gaps), choice.home)):
            # a short gap next to the run must follow it into the tier
            for g, gap in enumerate(seg.gaps):
                if gap.single_move and r in (gap.prev_run, gap.next_run):
                    gaps[g] = tier
        new = Choice(tuple(runs), tuple(gaps), choice.home)
        if not p.valid(seg, new):
            continue
        before = [g for g, gap in enumerate(seg.gaps) if gap.next_run == r]
        if before and gaps[before[0]] != tier and not p.read_only[tier]:
            g = before[0]
            n = len(p.window_options(seg, g, gaps[g], tier, False))
            for opt in reversed(range(n)):  # earliest prefetch first
                pf = list(new.prefetch_opt)
                pf[g] = opt
                out.append(Choice(new.runs, new.gaps, new.home, new.evict_opt, tuple(pf)))
        else:
            out.append(new)
    for g, gap in enumerate(seg.gaps):
        if (choice.gaps[g] != tier and gap.prev_run is not None and gap.next_run is not None
                and choice.runs[gap.prev_run] == tier and choice.runs[gap.next_run] == tier):
            gaps = list(choice.gaps)
            gaps[g] = tier
            out.append(Choice(choice.runs, tuple(gaps), choice.home))
    return out


def _read_in_place(state: CostState) -> None:
    """Trade transfers for slower accesses where the link is the bottleneck.

    Visits the tensors that move between tiers, most bytes moved first, and scores reading them
    where they are parked instead: the whole tensor in a slower tier it uses, or one run at a time
    moved there (which drops that run's prefetch and eviction). Keeps the best change that lowers
    the objective. Under memory pressure the evictions and prefetches share one slow link
    (PCIe to host DRAM); once it is busier than the compute that hides it, an access from the
    slower tier costs less than moving the tensor.
    """
    p = state.p
    order: list[tuple[int, str]] = []
    for vid, choice in state.assignment.items():
        seg = p.segments[vid]
        moves = p.layout(seg, choice)[1]
        if moves:
            order.append((-seg.nbytes * len(moves), vid))
    order.sort()
    for _neg, vid in order:
        seg = p.segments[vid]
        choice = state.assignment[vid]
        options: list[Choice] = []
        for k in sorted(set(choice.runs) | set(choice.gaps)):
            if k <= p.main or (k not in seg.tiers and k not in seg.homes):
                continue
            home = k if p.read_only[k] else choice.home
            if home not in (None, k):
                continue
            options.append(Choice.whole(seg, k, p.read_only[k]))
            for r in range(len(seg.runs)):
                if choice.runs[r] != k:
                    runs = list(choice.runs)
                    runs[r] = k
                    new = Choice(tuple(runs), choice.gaps, home)
                    if p.valid(seg, new):
                        options.append(new)
        best: tuple[float, Choice] | None = None
        for new in options:
            fits, d_time = state.probe(vid, new)
            if fits and (best is None or d_time < best[0]):
                best = (d_time, new)
        if best is not None and best[0] < 0.0:
            state.try_move(vid, best[1])


def _tune_windows(state: CostState) -> None:
    """Try every window option of every move; keep those that lower the objective."""
    p = state.p
    for vid in list(state.assignment):
        seg = p.segments[vid]
        for g, gap in enumerate(seg.gaps):
            for evict in (True, False):
                choice = state.assignment[vid]
                run = gap.prev_run if evict else gap.next_run
                if run is None:
                    continue
                src, dst = ((choice.runs[run], choice.gaps[g]) if evict
                            else (choice.gaps[g], choice.runs[run]))
                if src == dst or p.read_only[dst]:
                    continue
                for opt in range(len(p.window_options(seg, g, src, dst, evict))):
                    choice = state.assignment[vid]
                    opts = list(choice.evict_opt if evict else choice.prefetch_opt)
                    if opts[g] == opt:
                        continue
                    opts[g] = opt
                    ev = tuple(opts) if evict else choice.evict_opt
                    pf = choice.prefetch_opt if evict else tuple(opts)
                    state.try_move(vid, Choice(choice.runs, choice.gaps, choice.home, ev, pf))


def greedy_assignment(problem: PlacementProblem) -> Assignment:
    """The "greedy" strategy's choice for every tensor (module docstring).

    Starts from the best of: the naive placement, the naive placement after pinning, and the
    idle-gap spill; then only moves that lower the objective are made, so greedy is never worse
    than naive under the same fusion.
    """
    p = problem
    starts: list[Assignment] = []
    for pinned in ({}, p.pinned):
        try:
            starts.append(naive_assignment(p, pinned))
        except InfeasiblePlacementError:
            pass
    spilled = _idle_spill(p)
    if spilled is not None:
        starts.append(spilled)
    if not starts:
        return naive_assignment(p, p.pinned)  # raises, naming the tensor that does not fit
    states = [CostState(p, a) for a in starts]
    state = min(states, key=lambda s: (s.objective_value(), s.total_time_s()))
    for vid, choice in p.pinned.items():  # pins are where the MIP keeps these tensors
        state.try_move(vid, choice, accept_equal=True)
    for _round in range(2):
        _read_in_place(state)
        queue: list[tuple[float, str, int]] = []
        for vid, seg in p.segments.items():
            choice = state.assignment[vid]
            for tier in p.writable:
                if tier in seg.tiers and any(tier < k for k in choice.runs):
                    queue.append((-_benefit(p, vid, choice, tier), vid, tier))
        if not queue:
            break
        queue.sort()
        moved = False
        for _neg, vid, tier in queue:
            seg = p.segments[vid]
            for new in _candidates(p, seg, state.assignment[vid], tier):
                kept, _dt, _de = state.try_move(vid, new)
                if kept:
                    moved = True
                    break
        if not moved:
            break
    _tune_windows(state)
    _read_in_place(state)
    return dict(state.assignment)
