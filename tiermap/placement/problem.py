"""Placement in segment form, shared by every strategy: `PlacementProblem`.

The baselines are in baselines.py, the incremental scorer in cost_state.py, re-spreading
and chunking of moves in respread.py, the segment data in segments.py.

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

from collections.abc import Mapping

import numpy as np

from tiermap.bounds.knapsack import best_spread_span
from tiermap.costmodel.roofline import LOOP_RESERVED_ATTR, compute_time_s, program_kernels
from tiermap.errors import InfeasiblePlacementError, TiermapError
from tiermap.hardware.target import Target
from tiermap.ir.fusion import Fusion
from tiermap.ir.plan import Residency, Transfer, alias_pairs
from tiermap.ir.program import CONSTANT_KIND, Program
from tiermap.ir.untaken import Untaken
from tiermap.passes.base import Liveness
from tiermap.passes.liveness import compute_liveness
from tiermap.placement.respread import respread_moves
from tiermap.placement.segments import (
    SMALL_TENSOR_BUDGET_FRACTION,
    SMALL_TENSOR_BYTES,
    WINDOW_SLACK,
    WINDOW_STRETCH,
    Assignment,
    Choice,
    Chunks,
    Kernel,
    Move,
    MoveRoom,
    Piece,
    Segments,
    Tie,
    _merge,
    _segments,
)


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
                 pin: bool = True, untaken: Untaken | None = None) -> None:
        self.program = program
        # tensors kept out of host tiers: the applied program does not place their moves
        self.untaken = untaken if untaken is not None else Untaken()
        self.device_only: set[str] = set()
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
        # Bytes held at a step beyond the program's tensors: a planned loop's body while it runs
        # (LOOP_RESERVED_ATTR on the `while` op); every capacity check counts them.
        self.reserved = np.zeros((len(tiers), program.num_steps), dtype=np.int64)
        for op in program.ops:
            for name, nbytes in dict(op.attrs.get(LOOP_RESERVED_ATTR, {})).items():
                if name in self.tier_names:
                    self.reserved[self.tier_names.index(name), op.step] += int(nbytes)
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
        internal = self.fusion.unmaterialized() | program.unstored
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
            if self.untaken.device_only(program.name, vid):
                self.device_only.add(vid)
                tiers, homes = tuple(k for k in tiers if k <= self.main), ()
                if not tiers:
                    raise InfeasiblePlacementError(
                        f"tensor {vid} ({value.type}, {nbytes} bytes) must stay in device "
                        "memory (the applied program does not place its host moves) and fits "
                        "no device tier; fix: a target with more device memory, or "
                        "recompute='auto'")
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

    def _check_device_only(self, held: np.ndarray) -> None:
        """The tensors that must stay in device memory fit the device tiers at every step."""
        if not self.device_only:
            return
        n = self.num_steps
        need = np.zeros(n + 1, dtype=np.int64)
        for vid in self.device_only:
            seg = self.segments[vid]
            need[seg.first] += seg.nbytes
            need[seg.last + 1] -= seg.nbytes
        dev = [k for k in self.writable if k <= self.main]
        cap = int(sum(int(self.capacity[k]) for k in dev))
        over = np.cumsum(need[:n]) + self.reserved[dev].sum(axis=0) - cap
        if over.max() > 0:
            step = int(np.argmax(over))
            raise InfeasiblePlacementError(
                f"at step {step} the tensors that must stay in device memory (the applied "
                f"program does not place their host moves: {len(self.device_only)} tensors) "
                f"need {int(over[step])} bytes more than the device tiers "
                f"({', '.join(self.tier_names[k] for k in dev)}, {cap} B) hold; fix: a target "
                "with more device memory, or recompute='auto'")

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
        held = self.reserved.sum(axis=0)
        self._check_device_only(held)
        total = np.cumsum(total[:n]) + held
        writable_only = np.cumsum(writable_only[:n]) + held
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
        pressure = (self.live_bytes + self.reserved[k0] > self.capacity[k0]).astype(np.int64)
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
