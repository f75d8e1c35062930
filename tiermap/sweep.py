"""Capacity sweeps: plan one program for a range of sizes of one tier, and chart the result."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tiermap import pipeline
from tiermap.errors import InfeasiblePlacementError
from tiermap.formatting import fmt_bytes, fmt_time_s, html_table
from tiermap.frontend.lowering import lower
from tiermap.hardware.loader import load_target
from tiermap.hardware.target import Target
from tiermap.ir.program import Program
from tiermap.plots import new_figure, png_base64

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tiermap.ir.plan import Plan


@dataclass(frozen=True)
class SweepPoint:
    """One capacity of the swept tier and the plan found for it (None if nothing fits)."""

    capacity_bytes: int
    plan: Plan | None
    error: str = ""


@dataclass(frozen=True)
class Sweep:
    """Plans of one program for a range of capacities of one tier of a target."""

    target_name: str
    tier: str
    points: tuple[SweepPoint, ...]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per capacity: predicted, naive and greedy times, bound, traffic by tier."""
        out = []
        for pt in self.points:
            row: dict[str, Any] = {"capacity_bytes": pt.capacity_bytes}
            if pt.plan is None:
                row["error"] = pt.error
            else:
                row.update(predicted_time_s=pt.plan.predicted_time_s,
                           lower_bound_s=pt.plan.lower_bound_s,
                           **{f"{k}_time_s": v for k, v in pt.plan.baselines.items()},
                           **{f"traffic_{k}_bytes": v for k, v in pt.plan.traffic_bytes.items()})
            out.append(row)
        return out

    def plot(self) -> Figure:
        """Predicted time (and baselines, bound) and traffic per tier against the capacity."""
        fig = new_figure(10.0, 4.0)
        ax_t, ax_b = fig.subplots(1, 2)
        ok = [(p.capacity_bytes, p.plan) for p in self.points if p.plan is not None]
        caps = [cap for cap, _ in ok]
        series: dict[str, list[float]] = {}
        for _, plan in ok:
            series.setdefault(plan.strategy, []).append(plan.predicted_time_s)
            for name, value in plan.baselines.items():
                if name != plan.strategy:
                    series.setdefault(name, []).append(value)
            series.setdefault("lower bound", []).append(plan.lower_bound_s)
        for label, ys in series.items():
            if len(ys) == len(caps):
                ax_t.plot(caps, ys, marker="o", ms=3, label=label,
                          ls=":" if label == "lower bound" else "-")
        bad = [p.capacity_bytes for p in self.points if p.plan is None]
        for cap in bad:
            ax_t.axvline(cap, color="r", alpha=0.3)
        ax_t.set_xscale("log", base=2)
        ax_t.set_yscale("log")
        ax_t.set_xlabel(f"{self.tier} capacity (bytes)")
        ax_t.set_ylabel("predicted time (s)")
        ax_t.set_title(f"{self.target_name}: time vs {self.tier} size"
                       + (" (red: infeasible)" if bad else ""), fontsize=10)
        ax_t.legend(fontsize=8)
        ax_t.grid(True, which="both", alpha=0.2)
        tiers: list[str] = []
        for _, plan in ok:
            tiers += [k for k in plan.traffic_bytes if k not in tiers]
        for name in tiers:
            ys = [plan.traffic_bytes.get(name, 0.0) for _, plan in ok]
            if any(ys):
                ax_b.plot(caps, ys, marker="o", ms=3, label=name)
        ax_b.set_xscale("log", base=2)
        ax_b.set_yscale("symlog", linthresh=1.0)
        ax_b.set_xlabel(f"{self.tier} capacity (bytes)")
        ax_b.set_ylabel("traffic (bytes)")
        ax_b.set_title("traffic per tier", fontsize=10)
        ax_b.legend(fontsize=8)
        ax_b.grid(True, which="both", alpha=0.2)
        return fig

    def _repr_html_(self) -> str:
        rows = []
        for pt in self.points:
            if pt.plan is None:
                rows.append([fmt_bytes(pt.capacity_bytes), "infeasible", "-", "-", "-"])
                continue
            rows.append([fmt_bytes(pt.capacity_bytes), fmt_time_s(pt.plan.predicted_time_s),
                         fmt_time_s(pt.plan.baselines.get("greedy")),
                         fmt_time_s(pt.plan.baselines.get("naive")),
                         fmt_time_s(pt.plan.lower_bound_s)])
        table = html_table([f"{self.tier} capacity", "predicted", "greedy", "naive",
                             "lower bound"], rows)
        return table + f'<img src="data:image/png;base64,{png_base64(self.plot())}"/>'


def with_capacity(target: Target, tier: str, capacity_bytes: int) -> Target:
    """A copy of `target` whose tier `tier` holds `capacity_bytes`, named "sn40l@sram=1.00MiB"."""
    target.tier(tier)  # raises KeyError naming the known tiers
    tiers = tuple(dataclasses.replace(t, capacity_bytes=int(capacity_bytes)) if t.name == tier
                  else t for t in target.tiers)
    label = fmt_bytes(capacity_bytes).replace(" ", "")
    return dataclasses.replace(target, tiers=tiers, name=f"{target.name}@{tier}={label}",
                               path=None)


def sweep(fn_or_program: Callable[..., Any] | Program, *args: Any, target: str | Target,
          tier: str, capacities_bytes: Sequence[int], strategy: str = "mip",
          time_limit_s: float = 5.0, seed: int = 0, **kwargs: Any) -> Sweep:
    """Plan one program for each capacity of `tier` (the rest of `target` unchanged).

    The program is lowered once. A capacity for which nothing fits is kept as a point without a
    plan (its error message in `error`), so a sweep can start below the smallest feasible size.
    """
    base = load_target(target)
    base.tier(tier)
    if callable(fn_or_program) and not isinstance(fn_or_program, Program):
        program = lower(fn_or_program, *args, platform=base.platform, **kwargs)
    else:
        program = fn_or_program
    points = []
    for cap in capacities_bytes:
        try:
            p = pipeline.plan(program, target=with_capacity(base, tier, cap), strategy=strategy,
                             time_limit_s=time_limit_s, seed=seed)
            points.append(SweepPoint(int(cap), p))
        except InfeasiblePlacementError as exc:
            points.append(SweepPoint(int(cap), None, str(exc)))
    return Sweep(target_name=base.name, tier=tier, points=tuple(points))
