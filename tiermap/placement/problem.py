"""Placement in segment form, shared by every strategy; the "naive" and "greedy" strategies.

The segment form (the "mip" strategy in place_tiers.py uses the same one):

- A tensor's live range `[first, last]` is split at its accesses (the producer step and every
  step of an op that reads it). Consecutive access steps form a *run*; the steps between two runs,
  before the first run (a program input not used at once) or after the last one (a program
  output) form a *gap*.
- Each run resides in one tier; each gap has one *middle* tier. A run's tier differs from the next
  gap's middle tier by an *eviction*: a transfer over the first steps of the gap, overlapping
  their compute. The middle tier differs from the next run's tier by a *prefetch*: a transfer over
  the last steps of the gap, ending the step before the use. Window lengths are fixed per
  (gap, source, destination) by `PlacementProblem.window`: the fewest steps whose estimated
  compute hides the transfer (`WINDOW_SLACK` times over), at most half the gap when a gap could
  hold both an eviction and a prefetch (so the two never overlap), and the whole gap otherwise.
  The window is how long both tiers hold the tensor; the transfer itself runs over the steps of
  the window that hide it best under the estimated op times (`PlacementProblem.move_span`), and
  the destination holds it from the first of them. Gaps of one or two steps between runs hold
  at most one transfer: their middle tier is the tier of the run before or after.
- Read-only tiers (flash) are *homes*: a program input or constant placed there stays there for
  its whole live range, and runs or gaps in that tier read it in place; leaving the home for a
  writable tier is a transfer out of it, going back is free (the copy is dropped).

Plan semantics are those of tiermap/ir/plan.py; `layout` turns a choice into residency intervals
and transfers, and `CostState` scores choices incrementally under the same roofline model as
costmodel/evaluate.py (per-kernel roofline time split over the group's steps by flops; per-link
transfer shares; step time is their maximum).

Strategies:

- "naive" (no fusion): every tensor whole-life in the main-memory tier (`target.main_tier`); in
  program order, a tensor that does not fit goes to the next slower tier that fits (then, as a last
  resort, a faster one).
- "greedy" (XLA Memory-Space-Assignment style, with the state's fusion): start from main memory;
  under memory pressure, evict the idle gaps of the tensors with the longest idle gaps to the next
  slower tier (the prefetch back before the next use is part of the gap), whole tensors only when no
  idle gap is left; keep that or the naive-style spill, whichever the cost model prefers. Then
  visit tensors by benefit/√size (benefit: bytes accessed × the saving per byte of the faster
  tier) and move the whole tensor, or single runs with a prefetch before and an eviction after,
  into faster tiers when it fits (best fit on the occupancy timeline) and the predicted time drops.
  Before each such pass and at the end, tensors that move between tiers are scored read in place
  instead (whole, or one run at a time, in the slower tier they are parked in): under memory
  pressure the evictions and prefetches share one slow link, and once it is busier than the
  compute that hides it, slower accesses cost less than the moves (`_read_in_place`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from tiermap.bounds.knapsack import best_spread_span
from tiermap.costmodel.roofline import compute_time_s, program_kernels
from tiermap.errors import InfeasiblePlacementError, TiermapError
from tiermap.hardware.target import Target
from tiermap.ir.fusion import Fusion
from tiermap.ir.plan import Residency, Transfer, alias_pairs
from tiermap.ir.program import CONSTANT_KIND, Program
from tiermap.passes.liveness import Liveness, compute_liveness

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


class PlacementProblem:
    """A program on a target in segment form, with the decisions every strategy shares.

    Args:
        program: the program in schedule order.
        target: the hardware target.
        fusion: fusion decisions (None: every op alone).
        liveness: live ranges (computed when None).
        objective: "time" or "energy".
        pin: pin tiny tensors and tensors that never meet memory pressure to the fastest tier
            (the "naive" strategy does not).

    Raises:
        InfeasiblePlacementError: a tensor fits no tier that may hold it, or the tensors live at
            some step exceed the tiers' combined capacity.
    """

    def __init__(self, program: Program, target: Target, fusion: Fusion | None = None,
                 liveness: Liveness | None = None, objective: str = "time",
                 pin: bool = True) -> None:
        self.program = program
        self.target = target
        self.fusion = fusion if fusion is not None else Fusion()
        self.objective = objective
        self.num_steps = program.num_steps
        live = liveness if liveness is not None else compute_liveness(program)
        tiers = target.tiers
        self.tier_names = tuple(t.name for t in tiers)
        self.read_bw = np.array([t.read_bytes_per_s for t in tiers], dtype=float)
        self.write_bw = np.array([t.write_bytes_per_s for t in tiers], dtype=float)
        self.capacity = np.array([t.capacity_bytes for t in tiers], dtype=np.int64)
        self.energy_pj = np.array([t.energy_pj_per_byte or 0.0 for t in tiers], dtype=float)
        self.read_only = tuple(t.read_only for t in tiers)
        self.writable = tuple(i for i, t in enumerate(tiers) if t.holds_tensors and not t.read_only)
        self.homes = tuple(i for i, t in enumerate(tiers) if t.holds_tensors and t.read_only)
        if not self.writable:
            raise TiermapError(
                f"target '{target.name}' has no writable residency tier (tiers: "
                f"{', '.join(self.tier_names)}); fix: declare a tier that is not read_only and "
                "not a per-unit scratchpad")
        main_name = target.main_tier.name
        self.main = self.tier_names.index(main_name)
        if self.main not in self.writable:
            self.main = self.writable[0]
        self._build_kernels()
        self._build_segments(live)
        self._build_ties()
        self._check_feasible()
        self._estimate_op_times()
        self._window_cache: dict[tuple[str, int, int, int, bool], tuple[int, ...]] = {}
        # the last `respread_parts` call: its assignment (a choice per segment) and result
        self._respread_last: tuple[tuple[Choice, ...], tuple[
            dict[str, tuple[Residency, ...]], list[Transfer], float]] | None = None
        self._span_cache: dict[tuple[str, int, int, int, bool, int], tuple[int, int]] = {}
        self.pinned: Assignment = {}
        if pin:
            self._pin()

    # --- construction ---------------------------------------------------------------------

    def _build_kernels(self) -> None:
        program, target = self.program, self.target
        compute = [compute_time_s(op, target) for op in program.ops]
        kernels = []
        for k in program_kernels(program, self.fusion):
            flops = [program.ops[s].flops for s in k.steps]
            total = sum(flops)
            if total > 0.0:
                weights = tuple(f / total for f in flops)
            else:
                weights = tuple(1.0 / len(k.steps) for _ in k.steps)
            accesses = tuple([(vid, step, b, True) for vid, step, b in k.reads if b]
                             + [(vid, step, b, False) for vid, step, b in k.writes if b])
            kernels.append(Kernel(tuple(k.steps), weights, sum(compute[s] for s in k.steps),
                                  accesses))
        self.kernels = tuple(kernels)
        n = self.num_steps
        self.kernel_of_step = np.zeros(n, dtype=np.int64)
        self.step_weight = np.zeros(n, dtype=float)
        self.kernel_compute_s = np.array([k.compute_s for k in kernels], dtype=float)
        self.touches: dict[str, list[tuple[int, int, float, bool]]] = {}
        for j, kern in enumerate(kernels):
            for s, w in zip(kern.steps, kern.weights, strict=True):
                self.kernel_of_step[s] = j
                self.step_weight[s] = w
            for vid, step, b, is_read in kern.accesses:
                self.touches.setdefault(vid, []).append((j, step, b, is_read))

    def _build_segments(self, live: Liveness) -> None:
        program = self.program
        internal = self.fusion.unmaterialized()
        constants = {vid for op in program.ops if op.kind == CONSTANT_KIND for vid in op.outputs}
        inputs = set(program.inputs)
        self.segments: dict[str, Segments] = {}
        self.ro_eligible: set[str] = set()
        for vid, value in program.values.items():
            if vid in internal:
                continue
            first, last = live.ranges[vid]
            nbytes = value.nbytes
            eligible = vid in inputs or vid in constants
            if eligible:
                self.ro_eligible.add(vid)
            tiers = tuple(k for k in self.writable if self.capacity[k] >= nbytes)
            homes = tuple(k for k in self.homes if eligible and self.capacity[k] >= nbytes)
            if not tiers and not homes:
                self._too_big(vid, first, last, eligible)
            self.segments[vid] = _segments(vid, nbytes, first, last, live.accesses[vid],
                                           tiers, homes)

    def _build_ties(self) -> None:
        """The runs that alias ops tie together (`Tie`), and the groups of tensors they join
        (tensors tied to each other, transitively; the naive strategy places a group whole in
        one tier, and tensors are pinned group by group)."""
        ties: list[Tie] = []
        for op in self.program.ops:
            for x, y in alias_pairs(op.kind, op.inputs, op.outputs):
                sx, sy = self.segments.get(x), self.segments.get(y)
                if sx is None or sy is None or sx.nbytes != sy.nbytes:
                    continue  # fused away, or not a bitcast
                rx, ry = sx.run_of_step.get(op.step), sy.run_of_step.get(op.step)
                if rx is not None and ry is not None:
                    ties.append(Tie(x, rx, y, ry, op.step))
        self.ties = tuple(ties)
        self.ties_at: dict[tuple[str, int], list[Tie]] = {}
        parent: dict[str, str] = {}

        def root(v: str) -> str:
            while parent[v] != v:
                v = parent[v]
            return v

        for t in ties:
            self.ties_at.setdefault((t.src, t.src_run), []).append(t)
            self.ties_at.setdefault((t.dst, t.dst_run), []).append(t)
            parent.setdefault(t.src, t.src)
            parent.setdefault(t.dst, t.dst)
            a, b = root(t.src), root(t.dst)
            if a != b:
                parent[max(a, b)] = min(a, b)
        order = {vid: i for i, vid in enumerate(self.program.values)}
        groups: dict[str, list[str]] = {}
        for v in sorted(parent, key=order.__getitem__):
            groups.setdefault(root(v), []).append(v)
        self.tie_groups: dict[str, tuple[str, ...]] = {
            v: tuple(members) for members in groups.values() for v in members}

    def tie_group(self, vid: str) -> tuple[str, ...]:
        """The tensors tied to `vid` by alias ops, transitively, in program order (itself alone
        if none)."""
        return self.tie_groups.get(vid, (vid,))

    def with_ties(self, current: Mapping[str, Choice], vid: str, new: Choice
                  ) -> dict[str, Choice] | None:
        """`vid`'s new choice and the changes the ties then force on other tensors (each tied
        run follows the run it is tied to into its tier), or None when they cannot follow: a
        tier a tensor may not use (a read-only one), a pinned tensor, or two demands at odds."""
        out = {vid: new}
        if not self.tie_groups.get(vid):
            return out
        old = current[vid]
        decided = {(vid, r) for r, k in enumerate(new.runs) if k != old.runs[r]}
        queue = sorted(decided)
        while queue:
            w, r = queue.pop()
            k = out[w].runs[r]
            for t in self.ties_at.get((w, r), ()):
                other, orun = (t.dst, t.dst_run) if (t.src, t.src_run) == (w, r) else (
                    t.src, t.src_run)
                choice = out.get(other, current[other])
                if choice.runs[orun] == k:
                    continue
                pinned = self.pinned.get(other)
                if (other, orun) in decided or k not in self.segments[other].tiers or (
                        pinned is not None and pinned.runs[orun] != k):
                    return None
                moved = self._with_run(other, choice, orun, k)
                if moved is None:
                    return None
                out[other] = moved
                decided.add((other, orun))
                queue.append((other, orun))
        return out

    def _with_run(self, vid: str, choice: Choice, r: int, k: int) -> Choice | None:
        """`choice` with run r in writable tier k (and the one-move gaps next to it made valid),
        or None if that is not a valid choice."""
        seg = self.segments[vid]
        runs = list(choice.runs)
        runs[r] = k
        gaps = list(choice.gaps)
        for g, gap in enumerate(seg.gaps):
            if gap.single_move and r in (gap.prev_run, gap.next_run) and (
                    gap.prev_run is not None and gap.next_run is not None) and (
                    gaps[g] not in (runs[gap.prev_run], runs[gap.next_run])):
                gaps[g] = k
        out = Choice(tuple(runs), tuple(gaps), choice.home, choice.evict_opt, choice.prefetch_opt)
        return out if self.valid(seg, out) else None

    def ties_hold(self, assignment: Mapping[str, Choice]) -> bool:
        """Whether every tied pair of runs shares its tier under `assignment`."""
        return all(assignment[t.src].runs[t.src_run] == assignment[t.dst].runs[t.dst_run]
                   for t in self.ties)

    def _too_big(self, vid: str, first: int, last: int, eligible: bool) -> None:
        value = self.program.values[vid]
        may = [k for k in self.writable] + ([k for k in self.homes] if eligible else [])
        caps = ", ".join(f"{self.tier_names[k]} {int(self.capacity[k])} B" for k in may)
        largest = max((int(self.capacity[k]) for k in may), default=0)
        raise InfeasiblePlacementError(
            f"tensor {vid} ({value.type}, {value.nbytes} bytes, live at steps {first}..{last}) "
            f"fits no tier that may hold it: {caps}; the largest is short by "
            f"{value.nbytes - largest} bytes. Fix: a target with a larger tier, or a smaller "
            "program (shard or tile the tensor)")

    def _check_feasible(self) -> None:
        n = self.num_steps
        if n == 0:
            return
        total = np.zeros(n + 1, dtype=np.int64)
        writable_only = np.zeros(n + 1, dtype=np.int64)
        for seg in self.segments.values():
            total[seg.first] += seg.nbytes
            total[seg.last + 1] -= seg.nbytes
            if not seg.homes:
                writable_only[seg.first] += seg.nbytes
                writable_only[seg.last + 1] -= seg.nbytes
        total = np.cumsum(total[:n])
        writable_only = np.cumsum(writable_only[:n])
        self.live_bytes = total
        cap_w = int(sum(int(self.capacity[k]) for k in self.writable))
        cap_all = cap_w + int(sum(int(self.capacity[k]) for k in self.homes))
        for need, cap, what in ((writable_only, cap_w, "writable tiers"),
                                (total, cap_all, "residency tiers")):
            over = need - cap
            if over.max() > 0:
                step = int(np.argmax(over))
                here = sorted(((s.nbytes, v) for v, s in self.segments.items()
                               if s.first <= step <= s.last), reverse=True)[:3]
                names = ", ".join(f"{v} ({self.program.values[v].type}, {b} B)"
                                  for b, v in here)
                tiers = self.writable if what == "writable tiers" else self.writable + self.homes
                caps = ", ".join(f"{self.tier_names[k]} {int(self.capacity[k])} B" for k in tiers)
                raise InfeasiblePlacementError(
                    f"at step {step} the live tensors need {int(need[step])} bytes but the {what}"
                    f" hold {cap} ({caps}): {int(over[step])} bytes missing; largest live there: "
                    f"{names}. Fix: a target with more memory, or a smaller batch")

    def _estimate_op_times(self) -> None:
        """Op times with every tensor in main memory: the compute that transfers can hide."""
        main = self.main
        mem = np.zeros(len(self.kernels))
        for j, k in enumerate(self.kernels):
            mem[j] = sum(b / (self.read_bw[main] if r else self.write_bw[main])
                         for _v, _s, b, r in k.accesses)
        kernel_s = np.maximum(self.kernel_compute_s, mem) + self.target.op_overhead_s
        self.est_op_s = kernel_s[self.kernel_of_step] * self.step_weight if self.num_steps else (
            np.zeros(0))
        self.est_cum_s = np.concatenate([[0.0], np.cumsum(self.est_op_s)])

    def _pin(self) -> None:
        """Pin tiny tensors, and tensors that never meet memory pressure, to the fastest tier."""
        k0 = self.writable[0]
        n = self.num_steps
        small = [seg for seg in self.segments.values()
                 if seg.nbytes <= SMALL_TENSOR_BYTES and k0 in seg.tiers]
        diff = np.zeros(n + 1, dtype=np.int64)
        for seg in small:
            diff[seg.first] += seg.nbytes
            diff[seg.last + 1] -= seg.nbytes
        peak = int(np.cumsum(diff[:n]).max()) if n else 0
        if small and peak <= SMALL_TENSOR_BUDGET_FRACTION * int(self.capacity[k0]):
            for seg in small:
                self.pinned[seg.vid] = Choice.whole(seg, k0)
        if not self.dominates(k0) or n == 0:
            return
        pressure = (self.live_bytes > self.capacity[k0]).astype(np.int64)
        before = np.concatenate([[0], np.cumsum(pressure)])

        def calm(vid: str) -> bool:
            seg = self.segments[vid]
            return k0 in seg.tiers and before[seg.last + 1] - before[seg.first] == 0

        for vid, seg in self.segments.items():
            # tied tensors share tiers: a group is pinned whole or not at all
            if vid not in self.pinned and all(calm(v) for v in self.tie_group(vid)):
                self.pinned[vid] = Choice.whole(seg, k0)

    def dominates(self, k0: int) -> bool:
        """Whether tier k0 is at least as good as every residency tier for every access."""
        others = [k for k in self.writable + self.homes if k != k0]
        for k in others:
            if self.read_bw[k] > self.read_bw[k0] or self.write_bw[k] > self.write_bw[k0]:
                return False
            if self.objective == "energy" and self.energy_pj[k] < self.energy_pj[k0]:
                return False
        return True

    # --- windows and layouts --------------------------------------------------------------

    def evict_room(self, seg: Segments, g: int) -> int:
        """Longest eviction window of gap g (0: none possible)."""
        gap = seg.gaps[g]
        return gap.evict_cap_steps

    def prefetch_room(self, seg: Segments, g: int) -> int:
        """Longest prefetch window of gap g (0: none possible)."""
        gap = seg.gaps[g]
        return gap.prefetch_cap_steps if gap.next_run is not None else 0

    def link_bw(self, a: int, b: int) -> float:
        return self.target.link_bytes_per_s(self.tier_names[a], self.tier_names[b])

    def window(self, seg: Segments, g: int, src: int, dst: int, evict: bool, opt: int = 0
               ) -> int:
        """Steps of the eviction (at the gap's start) or prefetch (at its end) src → dst, for
        window option `opt` (see `window_options`)."""
        options = self.window_options(seg, g, src, dst, evict)
        return options[min(opt, len(options) - 1)]

    def window_options(self, seg: Segments, g: int, src: int, dst: int, evict: bool
                       ) -> tuple[int, ...]:
        """Window lengths a move may take: the fewest steps whose estimated compute hides it
        `WINDOW_SLACK` times over, then `WINDOW_STRETCH` times that, then all the room the gap
        has (longer windows spread the link's load; they hold the tensor in both tiers longer).
        """
        key = (seg.vid, g, src, dst, evict)
        hit = self._window_cache.get(key)
        if hit is not None:
            return hit
        gap = seg.gaps[g]
        cap = self.evict_room(seg, g) if evict else self.prefetch_room(seg, g)
        need_s = WINDOW_SLACK * seg.nbytes / self.link_bw(src, dst)
        cum = self.est_cum_s
        if evict:
            # smallest n with cum[lo + n] - cum[lo] >= need
            n = int(np.searchsorted(cum, cum[gap.lo] + need_s, side="left")) - gap.lo
        else:
            # smallest n with cum[hi + 1] - cum[hi + 1 - n] >= need
            idx = int(np.searchsorted(cum, cum[gap.hi + 1] - need_s, side="right")) - 1
            n = gap.hi + 1 - idx
        n = max(1, min(n, cap))
        if WINDOW_STRETCH <= 1:
            self._window_cache[key] = (n,)
            return (n,)
        options = tuple(sorted({n, max(1, min(WINDOW_STRETCH * n, cap)), max(1, cap)}))
        options = (n,) + tuple(o for o in options if o != n)
        self._window_cache[key] = options
        return options

    def move_span(self, seg: Segments, g: int, src: int, dst: int, evict: bool, steps: int
                  ) -> tuple[int, int]:
        """The steps a move of gap g with a window of `steps` steps (at the gap's start for an
        eviction, at its end for a prefetch) spreads its link time over: the run inside the
        window whose estimated op times hide it best (`bounds.knapsack.best_spread_span`), so
        that a copy can ride under a long kernel instead of stretching short ones. The tensor
        is held in the destination from the run's first step, in the source to the window's
        end."""
        key = (seg.vid, g, src, dst, evict, steps)
        hit = self._span_cache.get(key)
        if hit is not None:
            return hit
        gap = seg.gaps[g]
        lo = gap.lo if evict else gap.hi - steps + 1
        first, last, _excess_s = best_spread_span(seg.nbytes / self.link_bw(src, dst),
                                                  self.est_op_s[lo:lo + steps])
        span = (lo + first, lo + last)
        self._span_cache[key] = span
        return span

    def layout(self, seg: Segments, choice: Choice, rooms: list[MoveRoom] | None = None
               ) -> tuple[list[Piece], list[Move]]:
        """Residency pieces and transfers of a tensor under `choice` (see the module docstring).

        With `rooms`, appends per move where `respread_moves` may run it (`MoveRoom`)."""
        ro = self.read_only
        pieces: list[Piece] = []
        moves: list[Move] = []
        if choice.home is not None:
            pieces.append((choice.home, seg.first, seg.last))
        for r, run in enumerate(seg.runs):
            k = choice.runs[r]
            if not ro[k]:
                pieces.append((k, run.lo, run.hi))
        for g, gap in enumerate(seg.gaps):
            b = choice.gaps[g]
            b_from = gap.lo
            evict_at = -1
            if gap.prev_run is not None:
                a = choice.runs[gap.prev_run]
                if a != b and not ro[b]:
                    w = self.window(seg, g, a, b, True, choice.evict_opt[g])
                    start, end = self.move_span(seg, g, a, b, True, w)
                    src_piece = -1
                    if not ro[a]:
                        src_piece = len(pieces)
                        pieces.append((a, gap.lo, gap.lo + w - 1))
                    evict_at = len(moves)
                    moves.append((a, b, start, end))
                    if rooms is not None:
                        rooms.append(MoveRoom(gap.lo, gap.hi, len(pieces), src_piece, -1, True))
                    b_from = start
            if not ro[b]:
                pieces.append((b, b_from, gap.hi))
            if gap.next_run is not None:
                c = choice.runs[gap.next_run]
                if b != c and not ro[c]:
                    w = self.window(seg, g, b, c, False, choice.prefetch_opt[g])
                    start, end = self.move_span(seg, g, b, c, False, w)
                    if rooms is not None:
                        rooms.append(MoveRoom(gap.lo, gap.hi, len(pieces), -1, evict_at, False))
                        if evict_at >= 0:
                            rooms[-2] = rooms[-2]._replace(partner=len(moves))
                    pieces.append((c, start, gap.hi))
                    moves.append((b, c, start, end))
        return pieces, moves

    def valid(self, seg: Segments, choice: Choice) -> bool:
        """Whether `choice` respects the tiers, homes and single-move gaps of `seg`."""
        allowed = set(seg.tiers)
        if choice.home is not None:
            if choice.home not in seg.homes:
                return False
            allowed.add(choice.home)
        if any(k not in allowed for k in choice.runs + choice.gaps):
            return False
        for g, gap in enumerate(seg.gaps):
            b = choice.gaps[g]
            if gap.single_move and gap.prev_run is not None and gap.next_run is not None:
                if b not in (choice.runs[gap.prev_run], choice.runs[gap.next_run]):
                    return False
        return True

    def to_plan_parts(self, assignment: Mapping[str, Choice], respread: bool = False
                      ) -> tuple[dict[str, tuple[Residency, ...]], list[Transfer]]:
        """Residency intervals per tensor and the transfers, as tiermap/ir/plan.py defines them.

        With `respread`, each transfer's steps are then moved within its gap to where its
        link time costs least given all the others, or the move is made in chunks where that
        costs less (`respread_moves`)."""
        if respread:
            return self.respread_parts(assignment)[:2]
        return self._parts(self._layouts(assignment))

    def respread_parts(self, assignment: Mapping[str, Choice]
                       ) -> tuple[dict[str, tuple[Residency, ...]], list[Transfer], float]:
        """`to_plan_parts(assignment, respread=True)` and the predicted time of that plan
        (`respread_moves` has evaluated it). The last call's result is kept: the MIP's sweep
        check and the pass both re-spread the final assignment."""
        key = tuple(assignment[vid] for vid in self.segments)
        if self._respread_last is not None and self._respread_last[0] == key:
            residency, transfers, time_s = self._respread_last[1]
            return dict(residency), list(transfers), time_s
        layouts = self._layouts(assignment)
        chunks: Chunks = {}
        time_s = respread_moves(self, layouts, chunks=chunks)
        residency, transfers = self._parts(layouts, chunks)
        self._respread_last = (key, (dict(residency), list(transfers), time_s))
        return residency, transfers, time_s

    def _layouts(self, assignment: Mapping[str, Choice]
                 ) -> dict[str, tuple[list[Piece], list[Move], list[MoveRoom]]]:
        layouts: dict[str, tuple[list[Piece], list[Move], list[MoveRoom]]] = {}
        for vid, seg in self.segments.items():
            rooms: list[MoveRoom] = []
            pieces, moves = self.layout(seg, assignment[vid], rooms)
            layouts[vid] = (pieces, moves, rooms)
        return layouts

    def _parts(self, layouts: Mapping[str, tuple[list[Piece], list[Move], list[MoveRoom]]],
               chunks: Chunks | None = None
               ) -> tuple[dict[str, tuple[Residency, ...]], list[Transfer]]:
        """Residency and transfers of `layouts`; a move in `chunks` is one transfer per chunk."""
        residency: dict[str, tuple[Residency, ...]] = {}
        transfers: list[Transfer] = []
        names = self.tier_names
        for vid, (pieces, moves, _rooms) in layouts.items():
            nbytes = self.segments[vid].nbytes
            residency[vid] = tuple(Residency(names[k], lo, hi) for k, lo, hi in _merge(pieces))
            for i, (a, b, lo, hi) in enumerate(moves):
                parts = chunks.get((vid, i)) if chunks else None
                if parts:
                    transfers.extend(Transfer(vid, names[a], names[b], step, step, part_bytes)
                                     for step, part_bytes in parts)
                else:
                    transfers.append(Transfer(vid, names[a], names[b], lo, hi, nbytes))
        return residency, transfers


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
    from tiermap.costmodel.evaluate import evaluate

    n = problem.num_steps
    before = problem._parts(layouts)
    ev = evaluate(problem.program, problem.target, before[0], before[1], problem.fusion)
    op_s = np.array(ev.op_time_s)
    names = problem.tier_names
    occupancy = {k: np.array(ev.occupancy_bytes[names[k]], dtype=np.int64)
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
    fits = all(max(ev_after.occupancy_bytes.get(t.name, (0,)), default=0) <= t.capacity_bytes
               for t in problem.target.tiers)
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


# --- incremental cost --------------------------------------------------------------------------


class CostState:
    """Occupancy, link loads, kernel times and energy of an assignment, updated per tensor.

    Mirrors costmodel/evaluate.py for segment-form assignments: a run is read and written in its
    tier, kernels cost max(compute, Σ bytes / bandwidth) + overhead, split over their steps by
    flops, transfers spread evenly over their windows, step time is the max of op and link time.
    """

    def __init__(self, problem: PlacementProblem, assignment: Mapping[str, Choice]) -> None:
        self.p = problem
        n = problem.num_steps
        num_tiers = len(problem.tier_names)
        self.occ = np.zeros((num_tiers, n), dtype=np.int64)
        self.links: dict[tuple[int, int], np.ndarray] = {}
        self.kernel_mem_s = np.zeros(len(problem.kernels))
        self.energy_pj = 0.0
        self.assignment: dict[str, Choice] = {}
        for vid, choice in assignment.items():
            self._apply(vid, choice, +1)
            self.assignment[vid] = choice

    # contributions of one tensor, added (+1) or removed (-1)
    def _apply(self, vid: str, choice: Choice, sign: int) -> tuple[list[Piece], list[Move]]:
        p = self.p
        seg = p.segments[vid]
        pieces, moves = p.layout(seg, choice)
        for k, lo, hi in pieces:
            self.occ[k, lo:hi + 1] += sign * seg.nbytes
        for a, b, lo, hi in moves:
            key = (a, b) if a < b else (b, a)
            load = self.links.get(key)
            if load is None:
                load = self.links[key] = np.zeros(p.num_steps)
            load[lo:hi + 1] += sign * seg.nbytes / p.link_bw(a, b) / (hi - lo + 1)
            self.energy_pj += sign * seg.nbytes * (p.energy_pj[a] + p.energy_pj[b])
        for j, step, accessed, is_read in p.touches.get(vid, ()):
            k = choice.runs[seg.run_of_step[step]]
            bw = p.read_bw[k] if is_read else p.write_bw[k]
            self.kernel_mem_s[j] += sign * accessed / bw
            self.energy_pj += sign * accessed * p.energy_pj[k]
        return pieces, moves

    def remove(self, vid: str) -> None:
        """Take `vid`'s contributions out (its choice stays recorded)."""
        self._apply(vid, self.assignment[vid], -1)

    def add(self, vid: str, choice: Choice) -> None:
        """Put `vid`'s contributions back under `choice` (after `remove`)."""
        self._apply(vid, choice, +1)
        self.assignment[vid] = choice

    def assignment_of(self, vids: Iterable[str]) -> dict[str, Choice]:
        return {vid: self.assignment[vid] for vid in vids}

    def op_times(self, steps: np.ndarray) -> np.ndarray:
        """Op times (kernel roofline shares, no transfers) at `steps`."""
        p = self.p
        j = p.kernel_of_step[steps]
        kernel_s = np.maximum(p.kernel_compute_s[j], self.kernel_mem_s[j]) + p.target.op_overhead_s
        return kernel_s * p.step_weight[steps]

    def step_times(self, steps: np.ndarray) -> np.ndarray:
        """Step times at `steps` (an index array)."""
        out = self.op_times(steps)
        for load in self.links.values():
            out = np.maximum(out, load[steps])
        return out

    def total_time_s(self) -> float:
        return float(self.step_times(np.arange(self.p.num_steps)).sum())

    def within_capacity(self) -> bool:
        """Whether every tier fits its capacity at every step."""
        return bool((self.occ <= self.p.capacity[:, None]).all())

    def fits(self, pieces: Sequence[Piece]) -> bool:
        cap = self.p.capacity
        return all(self.occ[k, lo:hi + 1].max(initial=0) <= cap[k] for k, lo, hi in pieces)

    def _affected(self, changes: Mapping[str, Choice]) -> np.ndarray:
        """Steps whose time the `changes` (tensor → new choice) can alter."""
        p = self.p
        steps: set[int] = set()
        for vid, new in changes.items():
            seg = p.segments[vid]
            for j, _s, _b, _r in p.touches.get(vid, ()):
                steps.update(p.kernels[j].steps)
            for choice in (self.assignment[vid], new):
                for _a, _b, lo, hi in p.layout(seg, choice)[1]:
                    steps.update(range(lo, hi + 1))
        return np.array(sorted(steps), dtype=np.int64)

    def _swap(self, changes: Mapping[str, Choice], old: Mapping[str, Choice]) -> list[Piece]:
        """Replace the choices of `old`'s tensors by those in `changes`; the new pieces."""
        for vid, choice in old.items():
            self._apply(vid, choice, -1)
        pieces: list[Piece] = []
        for vid, choice in changes.items():
            pieces.extend(self._apply(vid, choice, +1)[0])
        return pieces

    def probe(self, vid: str, new: Choice, ignore_tier: int | None = None) -> tuple[bool, float]:
        """(fits, Δtime_s) of replacing `vid`'s choice by `new` (and the tensors tied to it as
        the ties demand, `PlacementProblem.with_ties`), changing nothing.

        `fits` checks the capacity of the tiers the changes put tensors in, `ignore_tier` aside;
        it is False when the ties cannot follow.
        """
        changes = self.p.with_ties(self.assignment, vid, new)
        if changes is None:
            return False, math.inf
        old = {v: self.assignment[v] for v in changes}
        steps = self._affected(changes)
        before_s = float(self.step_times(steps).sum()) if len(steps) else 0.0
        pieces = self._swap(changes, old)
        fits = self.fits([pc for pc in pieces if pc[0] != ignore_tier])
        after_s = float(self.step_times(steps).sum()) if len(steps) else 0.0
        self._swap(old, changes)
        return fits, after_s - before_s

    def try_move(self, vid: str, new: Choice, commit_if_better: bool = True,
                 accept_equal: bool = False) -> tuple[bool, float, float]:
        """Score replacing `vid`'s choice by `new` (with the tensors tied to it, as in
        `probe`); keep it if it fits and improves the objective (or, with `accept_equal`, does
        not worsen it).

        Returns (kept, Δtime_s, Δenergy_pj); Δ are inf when the change does not fit.
        """
        if new == self.assignment[vid]:
            return False, 0.0, 0.0
        changes = self.p.with_ties(self.assignment, vid, new)
        if changes is None:
            return False, math.inf, math.inf
        old = {v: self.assignment[v] for v in changes}
        steps = self._affected(changes)
        before_s = float(self.step_times(steps).sum()) if len(steps) else 0.0
        energy_before = self.energy_pj
        pieces = self._swap(changes, old)
        if not self.fits(pieces):
            self._swap(old, changes)
            return False, math.inf, math.inf
        after_s = float(self.step_times(steps).sum()) if len(steps) else 0.0
        d_time = after_s - before_s
        d_energy = self.energy_pj - energy_before
        tol_s = MOVE_TOLERANCE * max(before_s, 1e-30)
        if self.p.objective == "energy":
            tol_pj = MOVE_TOLERANCE * max(abs(energy_before), 1e-30)
            better = d_time <= tol_s and (d_energy < -tol_pj or accept_equal and d_energy <= tol_pj)
        else:
            better = d_time < -tol_s or accept_equal and d_time <= tol_s
        if better and commit_if_better:
            self.assignment.update(changes)
            return True, d_time, d_energy
        self._swap(old, changes)
        return False, d_time, d_energy

    def force(self, vid: str, new: Choice) -> None:
        """Replace `vid`'s choice (and its tied tensors', as in `probe`) regardless of cost or
        capacity.

        Raises:
            TiermapError: the ties cannot follow (`probe` says so first: it does not fit).
        """
        changes = self.p.with_ties(self.assignment, vid, new)
        if changes is None:
            raise TiermapError(f"tensor {vid}: the tensors tied to it by alias ops cannot follow "
                               "this choice")
        self._swap(changes, {v: self.assignment[v] for v in changes})
        self.assignment.update(changes)

    def objective_value(self) -> float:
        return self.energy_pj if self.p.objective == "energy" else self.total_time_s()


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
    n = problem.num_steps
    occ = np.zeros((len(problem.tier_names), n), dtype=np.int64)
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
