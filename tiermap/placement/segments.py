"""The segment form of a placement: runs, gaps, choices, moves, and the constants every
strategy shares (see placement/problem.py for the model)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

# Tensors up to this size (scalars included) are pinned to the fastest residency tier ...
SMALL_TENSOR_BYTES = 4096
# ... when at most this fraction of that tier is needed for them at any step.
SMALL_TENSOR_BUDGET_FRACTION = 0.25
# A transfer window spans enough steps to hide the transfer this many times over ...
WINDOW_SLACK = 2.0
# ... or, as a second option, this many times longer (a third option takes all the room; 1: the
# first option only).
WINDOW_STRETCH = 4
# Sweeps of `respread_moves` over the transfers.
RESPREAD_SWEEPS = 2
# `_chunk_moves`: a move is made in at most this many one-step chunks, each at least this
# fraction of it, and only where that saves at least this fraction of its evenly spread cost.
MAX_CHUNKS = 8
CHUNK_MIN_FRACTION = 1e-3
CHUNK_MIN_GAIN = 1e-3
# Eviction candidates the greedy strategy scores at each overflowing step.
RELIEVE_CANDIDATES = 8
# Relative improvement below which a greedy move is not worth making (float noise).
MOVE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class Run:
    """Consecutive access steps `lo..hi` of one tensor."""

    lo: int
    hi: int


@dataclass(frozen=True)
class Gap:
    """Steps `lo..hi` without accesses, between `prev_run` and `next_run` (None at the ends).

    `evict_cap_steps` / `prefetch_cap_steps` bound the eviction window at the start and the
    prefetch window at the end; `single_move` gaps (one or two steps between runs) hold at most
    one transfer.
    """

    lo: int
    hi: int
    prev_run: int | None
    next_run: int | None
    evict_cap_steps: int
    prefetch_cap_steps: int
    single_move: bool

    @property
    def num_steps(self) -> int:
        return self.hi - self.lo + 1


@dataclass(frozen=True)
class Segments:
    """One tensor in segment form: its runs and gaps, and the tiers it may use."""

    vid: str
    nbytes: int
    first: int
    last: int
    runs: tuple[Run, ...]
    gaps: tuple[Gap, ...]
    tiers: tuple[int, ...]
    homes: tuple[int, ...]
    run_of_step: Mapping[int, int] = field(hash=False)


@dataclass(frozen=True)
class Choice:
    """Tiers (indices into `target.tiers`) of a tensor's runs and gaps; `home`: read-only tier.

    `evict_opt[g]` / `prefetch_opt[g]` pick the window length of gap g's eviction / prefetch
    among `PlacementProblem.window_options` (0: the shortest that hides the copy; default).
    """

    runs: tuple[int, ...]
    gaps: tuple[int, ...]
    home: int | None = None
    evict_opt: tuple[int, ...] = ()
    prefetch_opt: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.evict_opt) != len(self.gaps):
            object.__setattr__(self, "evict_opt", (0,) * len(self.gaps))
        if len(self.prefetch_opt) != len(self.gaps):
            object.__setattr__(self, "prefetch_opt", (0,) * len(self.gaps))

    @staticmethod
    def whole(seg: Segments, tier: int, home: bool = False) -> Choice:
        """The whole live range in one tier (a home when `home`)."""
        return Choice((tier,) * len(seg.runs), (tier,) * len(seg.gaps), tier if home else None)


Assignment = dict[str, Choice]
Piece = tuple[int, int, int]  # (tier, from_step, to_step)
Move = tuple[int, int, int, int]  # (src tier, dst tier, start_step, end_step)
# A move made in chunks (`respread_moves`): (tensor, move index) -> [(step, bytes)], in step order.
Chunks = dict[tuple[str, int], list[tuple[int, int]]]


class MoveRoom(NamedTuple):
    """Where `respread_moves` may run a move of `PlacementProblem.layout`: within its gap's
    steps [lo, hi]. The tensor's piece `dst_piece` starts with the move; an eviction's source
    piece `src_piece` (-1: none, a read-only source) ends with it; `partner` is the other move
    of the same gap (-1: none), and an eviction ends before its partner prefetch starts."""

    lo: int
    hi: int
    dst_piece: int
    src_piece: int
    partner: int
    evict: bool


@dataclass(frozen=True)
class Kernel:
    """A kernel's fixed data: steps, flop-share weights, compute time and its memory accesses.

    `accesses` are (tensor id, step, bytes, is_read).
    """

    steps: tuple[int, ...]
    weights: tuple[float, ...]
    compute_s: float
    accesses: tuple[tuple[str, int, float, bool], ...]


@dataclass(frozen=True)
class Tie:
    """Run `src_run` of `src` (an alias op's operand) and run `dst_run` of `dst` (its result) share
    one tier: the result is the operand's buffer under another shape (tiermap/ir/plan.py)."""

    src: str
    src_run: int
    dst: str
    dst_run: int
    step: int




def _segments(vid: str, nbytes: int, first: int, last: int, accesses: Sequence[int],
              tiers: tuple[int, ...], homes: tuple[int, ...]) -> Segments:
    runs: list[Run] = []
    for s in accesses:
        if runs and s == runs[-1].hi + 1:
            runs[-1] = Run(runs[-1].lo, s)
        else:
            runs.append(Run(s, s))
    gaps: list[Gap] = []
    if not runs:
        gaps.append(Gap(first, last, None, None, 0, 0, False))
    else:
        if runs[0].lo > first:
            n = runs[0].lo - first
            gaps.append(Gap(first, runs[0].lo - 1, None, 0, 0, n, False))
        for r in range(len(runs) - 1):
            lo, hi = runs[r].hi + 1, runs[r + 1].lo - 1
            n = hi - lo + 1
            if n >= 3:
                half = (n - 1) // 2
                gaps.append(Gap(lo, hi, r, r + 1, half, n - 1 - half, False))
            else:
                gaps.append(Gap(lo, hi, r, r + 1, n, n, True))
        if runs[-1].hi < last:
            n = last - runs[-1].hi
            gaps.append(Gap(runs[-1].hi + 1, last, len(runs) - 1, None, n, 0, False))
    gaps.sort(key=lambda g: g.lo)
    run_of_step = {s: r for r, run in enumerate(runs) for s in range(run.lo, run.hi + 1)}
    return Segments(vid, nbytes, first, last, tuple(runs), tuple(gaps), tiers, homes,
                    run_of_step)


def _merge(pieces: Iterable[Piece]) -> list[Piece]:
    """Join pieces of one tier that touch or overlap; sorted by (from_step, tier)."""
    by_tier: dict[int, list[tuple[int, int]]] = {}
    for k, lo, hi in pieces:
        by_tier.setdefault(k, []).append((lo, hi))
    out: list[Piece] = []
    for k, spans in by_tier.items():
        spans.sort()
        cur_lo, cur_hi = spans[0]
        for lo, hi in spans[1:]:
            if lo <= cur_hi + 1:
                cur_hi = max(cur_hi, hi)
            else:
                out.append((k, cur_lo, cur_hi))
                cur_lo, cur_hi = lo, hi
        out.append((k, cur_lo, cur_hi))
    out.sort(key=lambda p: (p[1], p[0]))
    return out
