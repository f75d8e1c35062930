"""Re-spreading moves over their gaps, and making them in chunks, after a placement is chosen."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tiermap.costmodel.evaluate import evaluate
from tiermap.placement.segments import (
    CHUNK_MIN_FRACTION,
    CHUNK_MIN_GAIN,
    MAX_CHUNKS,
    RESPREAD_SWEEPS,
    Chunks,
    Move,
    MoveRoom,
    Piece,
)

if TYPE_CHECKING:
    from tiermap.placement.problem import PlacementProblem


def respread_moves(problem: PlacementProblem,
                   layouts: dict[str, tuple[list[Piece], list[Move], list[MoveRoom]]],
                   sweeps: int = RESPREAD_SWEEPS, chunks: Chunks | None = None) -> float:
    """Move each transfer's steps within its gap (largest first, `sweeps` times) to the run of
    steps where its evenly spread link time adds least to the step times, given the op times
    and every other transfer: a step lasts max(op, each link's load), so the cost of a run I
    of length L is sum_{s in I} max(base_s, load_s + t / L) - max(base_s, load_s), base_s being
    the op and the other links. The destination then holds the tensor from the run's first step
    and an eviction's source to its last, so only runs where both tiers have the room at every
    step they add are weighed; an eviction ends before the prefetch of the same gap starts.
    Then, with `chunks`, each move may be made in one-step chunks (`_chunk_moves`), recorded
    there. Kept only if the plan's predicted time falls and no tier overflows; `layouts` is
    updated in place. Returns the predicted time of the plan `layouts` (and `chunks`) then
    give."""
    n = problem.num_steps
    before = problem._parts(layouts)
    ev = evaluate(problem.program, problem.target, before[0], before[1], problem.fusion)
    op_s = np.array(ev.op_time_s)
    names = problem.tier_names
    occupancy = {k: np.array(ev.occupancy_bytes[names[k]], dtype=np.int64) + problem.reserved[k]
                 for k in range(len(names)) if names[k] in ev.occupancy_bytes}
    entries = []
    loads: dict[tuple[int, int], np.ndarray] = {}
    for vid, (_pieces, moves, _rooms) in layouts.items():
        nbytes = problem.segments[vid].nbytes
        for i, (a, b, lo, hi) in enumerate(moves):
            key = (min(a, b), max(a, b))
            transfer_s = nbytes / problem.link_bw(a, b)
            arr = loads.setdefault(key, np.zeros(n + 1))
            arr[lo:hi + 1] += transfer_s / (hi - lo + 1)
            entries.append((transfer_s, vid, i, key))
    if not entries:
        return ev.predicted_time_s
    saved = {vid: (list(p), list(m), list(r)) for vid, (p, m, r) in layouts.items()}
    entries.sort(key=lambda e: (-e[0], e[1], e[2]))
    for _sweep in range(sweeps):
        for transfer_s, vid, i, key in entries:
            _pieces, moves, _rooms = layouts[vid]
            _a, _b, lo, hi = moves[i]
            r_lo, r_hi, base, here = _lift_move(problem, layouts, occupancy, loads, op_s,
                                                transfer_s, vid, i, key)
            own = loads[key]
            now = np.maximum(base, here)
            best = (math.inf, 0, 0)
            m = r_hi - r_lo + 1
            length = 1
            lengths = {m, hi - lo + 1}
            while length < m:
                lengths.add(length)
                length = max(length + 1, int(length * 1.25))
            for length in sorted(lengths):
                extra = np.maximum(base, here + transfer_s / length) - now
                cum = np.concatenate([[0.0], np.cumsum(extra)])
                sums = cum[length:] - cum[:-length]
                j = int(np.argmin(sums))
                if sums[j] < best[0] - 1e-15:
                    best = (float(sums[j]), j, length)
            current = float(np.sum(np.maximum(base[lo - r_lo:hi - r_lo + 1],
                                              here[lo - r_lo:hi - r_lo + 1]
                                              + transfer_s / (hi - lo + 1))
                                   - now[lo - r_lo:hi - r_lo + 1]))
            if best[0] < current - 1e-15:
                lo, hi = r_lo + best[1], r_lo + best[1] + best[2] - 1
                _rerun_move(problem, layouts, occupancy, vid, i, lo, hi)
            own[lo:hi + 1] += transfer_s / (hi - lo + 1)
    if chunks is not None:
        _chunk_moves(problem, layouts, entries, loads, op_s, occupancy, chunks)
    after = problem._parts(layouts, chunks)
    ev_after = evaluate(problem.program, problem.target, after[0], after[1], problem.fusion)
    fits = all((np.array(ev_after.occupancy_bytes.get(t.name, (0,) * problem.num_steps))
                + problem.reserved[k]).max(initial=0) <= t.capacity_bytes
               for k, t in enumerate(problem.target.tiers))
    if not fits or ev_after.predicted_time_s >= ev.predicted_time_s:
        layouts.update(saved)
        if chunks is not None:
            chunks.clear()
        return ev.predicted_time_s
    return ev_after.predicted_time_s


def _chunk_moves(problem: PlacementProblem,
                 layouts: dict[str, tuple[list[Piece], list[Move], list[MoveRoom]]],
                 entries: Sequence[tuple[float, str, int, tuple[int, int]]],
                 loads: dict[tuple[int, int], np.ndarray], op_s: np.ndarray,
                 occupancy: Mapping[int, np.ndarray], chunks: Chunks) -> None:
    """Make each move (largest first) in up to MAX_CHUNKS one-step chunks where that costs less
    than its evenly spread run: a step with free link time f_s = max(0, base_s - load_s) takes
    a chunk of up to f_s at no cost, so the chunks go to the steps of the move's room
    (`_move_limits`) with the most free time, and what they cannot hide, t - sum f_s, is the
    chunked move's cost. The destination holds the tensor from the first chunk, an eviction's
    source to the last. Updates `layouts`, `loads` and `occupancy`, and records the chunks."""
    for transfer_s, vid, i, key in entries:
        _pieces, moves, _rooms = layouts[vid]
        a, b, lo, hi = moves[i]
        nbytes = problem.segments[vid].nbytes
        r_lo, r_hi, base, here = _lift_move(problem, layouts, occupancy, loads, op_s,
                                            transfer_s, vid, i, key)
        own = loads[key]
        now = np.maximum(base, here)
        window = slice(lo - r_lo, hi - r_lo + 1)
        current = float(np.sum(np.maximum(base[window], here[window]
                                          + transfer_s / (hi - lo + 1)) - now[window]))
        free = np.maximum(base - here, 0.0)
        order = np.argsort(-free, kind="stable")[:MAX_CHUNKS]
        order = order[free[order] >= CHUNK_MIN_FRACTION * transfer_s]
        total_free = float(free[order].sum())
        cost = max(transfer_s - total_free, 0.0)
        if len(order) < 2 or cost >= current * (1 - CHUNK_MIN_GAIN) - 1e-15:
            own[lo:hi + 1] += transfer_s / (hi - lo + 1)
            continue
        order = np.sort(order)
        share = free[order] + cost / len(order) if cost > 0 else (
            free[order] * (transfer_s / total_free))
        # whole bytes per chunk, in proportion to its share, adding up to the tensor
        cum = np.round(np.cumsum(share) / float(share.sum()) * nbytes).astype(np.int64)
        parts = np.diff(np.concatenate([[0], cum]))
        steps = [r_lo + int(j) for j, part in zip(order, parts, strict=True) if part > 0]
        part_bytes = [int(part) for part in parts if part > 0]
        _rerun_move(problem, layouts, occupancy, vid, i, steps[0], steps[-1])
        chunks[(vid, i)] = list(zip(steps, part_bytes, strict=True))
        bw = problem.link_bw(a, b)
        for step, part in zip(steps, part_bytes, strict=True):
            own[step] += part / bw


def _lift_move(problem: PlacementProblem,
               layouts: Mapping[str, tuple[list[Piece], list[Move], list[MoveRoom]]],
               occupancy: Mapping[int, np.ndarray], loads: Mapping[tuple[int, int], np.ndarray],
               op_s: np.ndarray, transfer_s: float, vid: str, i: int, key: tuple[int, int]
               ) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Take move i of `vid` (evenly spread) off its link's load, for `respread_moves` or
    `_chunk_moves` to put it back: the steps [r_lo, r_hi] it may run in (`_move_limits`), what
    a step there lasts without it (op and the other links) and its link's load there (a view
    of `loads[key]`)."""
    pieces, moves, rooms = layouts[vid]
    _a, _b, lo, hi = moves[i]
    r_lo, r_hi = _move_limits(problem, occupancy, pieces, moves, rooms, i, lo, hi,
                              problem.segments[vid].nbytes)
    own = loads[key]
    own[lo:hi + 1] -= transfer_s / (hi - lo + 1)
    base = op_s[r_lo:r_hi + 1].copy()
    for other, arr in loads.items():
        if other != key:
            base = np.maximum(base, arr[r_lo:r_hi + 1])
    return r_lo, r_hi, base, own[r_lo:r_hi + 1]


def _rerun_move(problem: PlacementProblem,
                layouts: dict[str, tuple[list[Piece], list[Move], list[MoveRoom]]],
                occupancy: Mapping[int, np.ndarray], vid: str, i: int, new_lo: int,
                new_hi: int) -> None:
    """Move i of `vid` now runs over steps [new_lo, new_hi]: the destination holds the tensor
    from new_lo, an eviction's source to new_hi (pieces and occupancy follow)."""
    pieces, moves, rooms = layouts[vid]
    a, b, lo, _hi = moves[i]
    nbytes = problem.segments[vid].nbytes
    _hold(occupancy, b, new_lo, lo, nbytes)
    room = rooms[i]
    if room.src_piece >= 0:
        k, p_lo, p_hi = pieces[room.src_piece]
        _hold(occupancy, a, p_hi + 1, new_hi + 1, nbytes)
        pieces[room.src_piece] = (k, p_lo, new_hi)
    moves[i] = (a, b, new_lo, new_hi)
    k, _old_lo, p_hi = pieces[room.dst_piece]
    pieces[room.dst_piece] = (k, new_lo, p_hi)


def _move_limits(problem: PlacementProblem, occupancy: Mapping[int, np.ndarray],
                 pieces: Sequence[Piece], moves: Sequence[Move], rooms: Sequence[MoveRoom],
                 i: int, lo: int, hi: int, nbytes: int) -> tuple[int, int]:
    """The steps [r_lo, r_hi] within which a move now at [lo, hi] may run: its gap, after its
    gap's eviction or before its prefetch, and where its destination (from an earlier start)
    and an eviction's source (to a later end) have the room for the tensor at every step."""
    room, dst = rooms[i], moves[i][1]
    r_lo, r_hi = room.lo, room.hi
    if room.partner >= 0:
        # the eviction ends before the prefetch starts, and where the prefetch goes back to the
        # eviction's source, that tier is left for a step at least (else the two residencies
        # would be one, with no start for the prefetch)
        partner = moves[room.partner]
        if room.evict:
            same = room.src_piece >= 0 and partner[1] == pieces[room.src_piece][0]
            r_hi = min(r_hi, partner[2] - (2 if same else 1))
        else:
            evict = rooms[room.partner]
            r_lo = max(r_lo, partner[3] + 1)
            if evict.src_piece >= 0 and pieces[evict.src_piece][0] == dst:
                r_lo = max(r_lo, pieces[evict.src_piece][2] + 2)
    occ = occupancy.get(dst)
    if occ is None:
        r_lo = max(r_lo, lo)
    else:
        full = np.flatnonzero(occ[r_lo:lo] + nbytes > problem.capacity[dst])
        if len(full):
            r_lo = r_lo + int(full[-1]) + 1
    if room.src_piece >= 0:
        src, _p_lo, p_hi = pieces[room.src_piece]
        occ = occupancy.get(src)
        if occ is None:
            r_hi = min(r_hi, p_hi)
        else:
            full = np.flatnonzero(occ[p_hi + 1:r_hi + 1] + nbytes > problem.capacity[src])
            if len(full):
                r_hi = p_hi + int(full[0])
    return min(r_lo, lo), max(r_hi, hi)  # the move's own steps stay open to it


def _hold(occupancy: Mapping[int, np.ndarray], tier: int, start: int, stop: int,
          nbytes: int) -> None:
    """The tier holds the tensor over steps [start, stop) more (or, with stop < start, over
    [stop, start) no longer)."""
    occ = occupancy.get(tier)
    if occ is None or start == stop:
        return
    if start < stop:
        occ[start:stop] += nbytes
    else:
        occ[stop:start] -= nbytes
