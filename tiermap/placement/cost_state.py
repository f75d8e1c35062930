"""`CostState`: a segment-form placement scored incrementally, as costmodel/evaluate.py does."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from tiermap.errors import TiermapError
from tiermap.placement.problem import PlacementProblem
from tiermap.placement.segments import MOVE_TOLERANCE, Choice, Move, Piece

# --- incremental cost --------------------------------------------------------------------------


class CostState:
    """Occupancy, link loads, kernel times and energy of an assignment, updated per tensor.

    Mirrors costmodel/evaluate.py for segment-form assignments: a run is read and written in its
    tier, kernels cost max(compute, Σ bytes / bandwidth) + overhead, split over their steps by
    flops, transfers spread evenly over their windows, step time is the max of op and link time.
    """

    def __init__(self, problem: PlacementProblem, assignment: Mapping[str, Choice]) -> None:
        self.p = problem
        self.occ = problem.reserved.copy()  # a loop body's bytes while it runs (problem.py)
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
