"""Charts of a plan (matplotlib): roofline, tier occupancy, placement timeline, traffic by strategy
(capacity sweeps, which re-plan, are in sweep.py).

Every function returns a `matplotlib.figure.Figure` built without pyplot, so nothing depends on a
display or a global backend (figures render with Agg); notebooks show the returned figure.
"""

from __future__ import annotations

import base64
import functools
import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiermap.costmodel import io_bounds as bounds
from tiermap.errors import ChoiceError
from tiermap.formatting import fmt_bytes, fmt_rate_bytes_per_s, fmt_time_s, write_atomic
from tiermap.hardware.loader import load_target
from tiermap.ir.plan import occupancy_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from tiermap.costmodel.fidelity import CheckResult
    from tiermap.hardware.target import Target
    from tiermap.ir.plan import Plan

# Fastest tier first: warm to cool.
_TIER_COLOURS = ("#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd", "#8c564b", "#7f7f7f")


def tier_colours(target: Target) -> dict[str, str]:
    """A colour per tier of `target`, fastest first (red, orange, green, blue, ...)."""
    return {t.name: _TIER_COLOURS[i % len(_TIER_COLOURS)] for i, t in enumerate(target.tiers)}


def new_figure(width_in: float = 8.0, height_in: float = 4.5) -> Figure:
    """A Figure with an Agg canvas, independent of pyplot and of any display.

    In IPython/Jupyter, figures display as PNG when they are a cell's value.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _show_figures_in_ipython(Figure)
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _show_figures_in_ipython(figure_class: type) -> None:
    """Register a PNG formatter for Figures with a running IPython shell, unless one exists
    (pyplot-free figures have no display hook of their own)."""
    import sys

    ipython_module = sys.modules.get("IPython")
    shell = ipython_module.get_ipython() if ipython_module is not None else None
    if shell is None:
        return
    formatter = shell.display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(figure_class)
    except KeyError:
        formatter.for_type(figure_class, png_bytes)


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def png_base64(fig: Figure, dpi: int = 90) -> str:
    """The figure as base64 PNG, for `<img src="data:image/png;base64,...">`."""
    return base64.b64encode(png_bytes(fig, dpi=dpi)).decode("ascii")


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write the figure as PNG (or SVG/PDF by suffix) atomically; returns the path."""
    out = Path(path)
    fmt = out.suffix.lstrip(".").lower() or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    write_atomic(out, buf.getvalue())
    return out


def _dominant_dtype(plan: Plan) -> str:
    """The dtype the most FLOPs are computed in (from the attached program, else f32)."""
    if plan.program is None:
        return "f32"
    flops_by_dtype: dict[str, float] = {}
    for op in plan.program.ops:
        flops_by_dtype[op.dtype] = flops_by_dtype.get(op.dtype, 0.0) + op.flops
    if not flops_by_dtype or max(flops_by_dtype.values()) <= 0:
        return "f32"
    return max(flops_by_dtype, key=lambda k: flops_by_dtype[k])


# --- roofline ------------------------------------------------------------------------------------


def roofline(plan: Plan, ax: Axes | None = None) -> Figure:
    """Each op at (FLOPs per byte moved, FLOPs per predicted second) under the target's roofs.

    Roofs: the compute peak of the program's main dtype (other dtypes dashed) and one slanted roof
    per tier (intensity x read bandwidth). Points are coloured by the tier that carries most of
    the op's bytes; ops without FLOPs or bytes are left out.
    """
    if ax is None:
        fig = new_figure()
        ax = fig.add_subplot()
    else:
        fig = ax.get_figure(root=True)  # type: ignore[assignment]
    target = plan.target
    colours = tier_colours(target)
    dtype = _dominant_dtype(plan)
    peak = target.peak(dtype)
    points: dict[str, tuple[list[float], list[float]]] = {}
    for op in plan.ops:
        moved = sum(op.bytes_by_tier.values())
        if op.flops <= 0 or moved <= 0 or op.predicted_time_s <= 0:
            continue
        tier_name = max(op.bytes_by_tier, key=lambda k: op.bytes_by_tier[k])
        xs, ys = points.setdefault(tier_name, ([], []))
        xs.append(op.flops / moved)
        ys.append(op.flops / op.predicted_time_s)
    all_x = [x for xs, _ in points.values() for x in xs]
    lo = min(all_x + [1e-2]) / 4
    hi = max(all_x + [peak / min(t.read_bytes_per_s for t in target.tiers) * 4])
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for tier in target.tiers:
        roof = [min(peak, x * tier.read_bytes_per_s) for x in grid]
        ax.plot(grid, roof, color=colours[tier.name], lw=1.5,
                label=f"{tier.name} roof ({_rate(tier.read_bytes_per_s)})")
    for name, value in target.peak_flops_per_s.items():
        if name != dtype and value != peak:
            ax.axhline(value, color="0.6", ls="--", lw=0.8)
            ax.annotate(f"{name} peak", (grid[1], value), fontsize=7, color="0.4",
                        va="bottom")
    for tier_name, (xs, ys) in points.items():
        ax.scatter(xs, ys, s=12, alpha=0.7, color=colours.get(tier_name, "k"), edgecolors="none",
                   label=f"ops, most bytes in {tier_name} ({len(xs)})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("operational intensity (FLOP / byte moved)")
    ax.set_ylabel("attained FLOP/s (predicted)")
    source = dtype if dtype in target.peak_flops_per_s else next(
        (k for k, v in target.peak_flops_per_s.items() if v == peak), dtype)
    which = f"{dtype} peak" if source == dtype else f"{dtype} ops at the {source} peak"
    ax.set_title(f"Roofline: {plan.program_name} on {target.name} ({which}, "
                 f"{peak:.3g} FLOP/s)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.2)
    return fig


def _rate(rate_bytes_per_s: float) -> str:
    return fmt_rate_bytes_per_s(rate_bytes_per_s)


# --- occupancy -----------------------------------------------------------------------------------


def occupancy(plan: Plan, top_tensors: int = 6) -> Figure:
    """Bytes resident in each tier at every step, stacked by tensor (the `top_tensors` with the
    largest footprint, bytes × steps, in each tier; the rest as "other"), with the tier's
    capacity as a dashed line."""
    occ = occupancy_bytes(plan)
    tiers = [t for t in plan.target.tiers if max(occ.get(t.name, [0]), default=0) > 0]
    fig = new_figure(8.0, 1.2 + 2.0 * max(len(tiers), 1))
    if not tiers:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no tensor is resident in any tier", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(len(tiers), 1, sharex=True, squeeze=False)[:, 0]
    steps = list(range(plan.num_steps + 1))
    colours = tier_colours(plan.target)
    for ax, tier in zip(axes, tiers, strict=True):
        scale, unit = _byte_scale(max(max(occ[tier.name]), 1))
        sizes: dict[str, int] = {}  # footprint in this tier: bytes × resident steps
        for tensor in plan.tensors:
            resident = sum(r.to_step - r.from_step + 1 for r in tensor.residency
                           if r.tier == tier.name)
            if resident:
                sizes[tensor.id] = tensor.nbytes * resident
        top = sorted(sizes, key=lambda tid: (-sizes[tid], tid))[:top_tensors]
        by_id = {t.id: t for t in plan.tensors}
        base = [0.0] * (plan.num_steps + 1)
        cmap = _cmap(len(top))
        for i, tid in enumerate(top):
            row = [0.0] * (plan.num_steps + 1)
            for r in by_id[tid].residency:
                if r.tier == tier.name:
                    for s in range(max(r.from_step, 0), min(r.to_step, plan.num_steps - 1) + 1):
                        row[s] += by_id[tid].nbytes / scale
            row[-1] = row[-2] if plan.num_steps else 0.0
            upper = [b + v for b, v in zip(base, row, strict=True)]
            ax.fill_between(steps, base, upper, step="post", color=cmap[i], lw=0,
                            label=f"{tid} {_shape_text(by_id[tid])}")
            base = upper
        total = [v / scale for v in occ[tier.name]] + [occ[tier.name][-1] / scale]
        ax.fill_between(steps, base, [max(b, t) for b, t in zip(base, total, strict=True)],
                        step="post", color="0.8", lw=0, label="other")
        ax.step(steps, total, where="post", color=colours[tier.name], lw=1.0)
        cap = tier.capacity_bytes / scale
        if cap <= 1.5 * max(total):
            ax.axhline(cap, color=colours[tier.name], ls="--", lw=1.2)
            ax.annotate(f"capacity {fmt_bytes(tier.capacity_bytes)}", (0, cap), fontsize=7,
                        va="bottom")
        else:
            ax.set_title(f"capacity {fmt_bytes(tier.capacity_bytes)} (off scale)", fontsize=7,
                         loc="right")
        ax.set_ylabel(f"{tier.name} ({unit})")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(True, alpha=0.2)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"Tier occupancy: {plan.program_name} on {plan.target.name} ({plan.strategy})",
                 fontsize=10)
    return fig


def _resident_steps(tensor: Any) -> int:
    return sum(r.to_step - r.from_step + 1 for r in tensor.residency)


def _byte_scale(max_bytes: float) -> tuple[float, str]:
    for scale, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if max_bytes >= scale:
            return float(scale), unit
    return 1.0, "B"


def _cmap(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def _shape_text(tensor: Any) -> str:
    return f"{tensor.dtype}[{','.join(str(d) for d in tensor.shape)}]"


# --- placement timeline --------------------------------------------------------------------------


def placement_timeline(plan: Plan, top_tensors: int = 24, title: str | None = None) -> Figure:
    """The tensors with the largest footprint (bytes × resident steps) as rows, in order of
    creation, one bar per residency interval coloured by tier; a transfer is a black-edged
    hatched bar over its steps with a triangle pointing to a faster (▲) or slower (▼) tier."""
    from matplotlib.patches import Patch

    tensors = sorted((t for t in plan.tensors if t.materialized and t.residency),
                     key=lambda t: (-t.nbytes * _resident_steps(t), t.id))[:top_tensors]
    tensors.sort(key=lambda t: (max(t.producer_step, 0), t.id))
    fig = new_figure(9.0, 1.5 + 0.28 * max(len(tensors), 1))
    ax = fig.add_subplot()
    colours = tier_colours(plan.target)
    transfers: dict[str, list[Any]] = {}
    for x in plan.transfers:
        transfers.setdefault(x.tensor, []).append(x)
    for row, tensor in enumerate(tensors):
        for r in tensor.residency:
            ax.barh(row, r.to_step - r.from_step + 1, left=r.from_step, height=0.6,
                    color=colours.get(r.tier, "0.5"), edgecolor=colours.get(r.tier, "0.5"),
                    lw=0.8, alpha=0.85)
        for x in transfers.get(tensor.id, []):
            ax.barh(row, x.end_step - x.start_step + 1, left=x.start_step, height=0.8,
                    fill=False, hatch="///", edgecolor="k", lw=0.8)
            faster = plan.target.tier_index(x.dst) < plan.target.tier_index(x.src)
            ax.annotate("▲" if faster else "▼", (x.end_step + 1, row), fontsize=7,
                        va="center", color=colours.get(x.dst, "k"))
    ax.set_yticks(range(len(tensors)))
    ax.set_yticklabels([f"{t.id} {_shape_text(t)} ({fmt_bytes(t.nbytes)})" for t in tensors],
                       fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(plan.num_steps, 1))
    ax.set_xlabel("step")
    handles = [Patch(color=colours[t.name], label=t.name) for t in plan.target.tiers
               if any(r.tier == t.name for tp in tensors for r in tp.residency)]
    handles.append(Patch(fill=False, hatch="///", edgecolor="k",
                         label="transfer (▲ to a faster tier, ▼ to a slower one)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or f"Placement of the {len(tensors)} largest footprints: "
                 f"{plan.program_name} on {plan.target.name} ({plan.strategy})", fontsize=10)
    ax.grid(True, axis="x", alpha=0.2)
    return fig


def loop_iteration(plan: Plan, op_id: str, top_tensors: int = 24) -> Figure:
    """The placement timeline of one steady-state iteration of the loop `op_id` of `plan` (its
    body plan), titled with the trip count and the loop's time."""
    loop = next((x for x in plan.loops if x.op_id == op_id), None)
    if loop is None:
        raise ChoiceError(f"plan '{plan.program_name}' has no loop {op_id!r}; its loops: "
                          f"{', '.join(x.op_id for x in plan.loops) or 'none'}")
    trips = f"{loop.trips}{'' if loop.static_trips else ' (assumed)'}"
    return placement_timeline(loop.body, top_tensors, title=(
        f"Loop {op_id}: one iteration of {trips} ({loop.body.num_steps} steps, "
        f"{loop.iteration_s * 1e6:.3g} us each; loop {loop.time_s * 1e6:.4g} us) on "
        f"{plan.target.name}"))


# --- traffic by strategy -------------------------------------------------------------------------


def traffic_comparison(plans: Mapping[str, Plan] | Sequence[Plan]) -> Figure:
    """Bytes moved per tier for several plans of one program (e.g. naive, greedy, mip), grouped
    by tier; the legend gives each plan's predicted time."""
    named = dict(plans) if isinstance(plans, Mapping) else {p.strategy: p for p in plans}
    fig = new_figure(8.0, 4.0)
    ax = fig.add_subplot()
    if not named:
        ax.text(0.5, 0.5, "no plans", ha="center", va="center")
        ax.set_axis_off()
        return fig
    first = next(iter(named.values()))
    tiers = [t.name for t in first.target.tiers]
    for p in named.values():
        tiers += [name for name in p.traffic_bytes if name not in tiers]
    peak = max((v for p in named.values() for v in p.traffic_bytes.values()), default=1.0)
    scale, unit = _byte_scale(max(peak, 1.0))
    width = 0.8 / len(named)
    cmap = _cmap(len(named))
    for i, (label, p) in enumerate(named.items()):
        xs = [j + (i - (len(named) - 1) / 2) * width for j in range(len(tiers))]
        ys = [p.traffic_bytes.get(name, 0.0) / scale for name in tiers]
        ax.bar(xs, ys, width=width, color=cmap[i],
               label=f"{label}: {fmt_time_s(p.predicted_time_s)}")
    ax.set_xticks(range(len(tiers)))
    ax.set_xticklabels(tiers)
    ax.set_ylabel(f"traffic ({unit})")
    ax.set_title(f"Traffic per tier: {first.program_name} on {first.target.name}", fontsize=10)
    ax.legend(fontsize=8, title="plan: predicted time", title_fontsize=8)
    ax.grid(True, axis="y", alpha=0.2)
    return fig


# --- attention IO --------------------------------------------------------------------------------


def attention_traffic(n: int = 1024, d: int = 64, elem_bytes: int = 2,
                      fast_bytes: int = 192 * 1024, batch_heads: int = 1,
                      targets: Sequence[str] = ("a100", "h100", "sn40l")) -> Figure:
    """Attention's memory traffic against FlashAttention's block size and the on-chip capacity,
    next to the IO lower bound (Saha & Ye 2024), standard attention and the compulsory 4Nd.

    Left: FlashAttention-1 traffic for each KV block size Bc (Br = min(Bc, d)) with `fast_bytes`
    of fast memory; block sizes whose working set does not fit are greyed. Right: traffic with
    FlashAttention's own block rule for each capacity, with the per-unit tile budget of
    `targets` marked.
    """
    fig = new_figure(11.0, 4.2)
    ax_b, ax_m = fig.subplots(1, 2)
    fast_words = fast_bytes // elem_bytes
    lower = bounds.attention_io_lower_bound_bytes(n, d, fast_bytes, elem_bytes, batch_heads)
    unfused = bounds.unfused_attention_traffic_bytes(n, d, elem_bytes, batch_heads)
    compulsory = bounds.attention_compulsory_bytes(n, d, elem_bytes, batch_heads)
    blocks = [2 ** i for i in range(2, max(3, n.bit_length()))]
    fits = [bounds.flash_attention_working_set_words(d, min(b, d), b) <= fast_words
            for b in blocks]
    traffic = [bounds.flash_attention_traffic_bytes(n, d, min(b, d), b, elem_bytes, batch_heads)
               for b in blocks]
    ax_b.plot([b for b, ok in zip(blocks, fits, strict=True) if ok],
              [t for t, ok in zip(traffic, fits, strict=True) if ok], marker="o", ms=4,
              label="FlashAttention-1 (fits)")
    ax_b.plot([b for b, ok in zip(blocks, fits, strict=True) if not ok],
              [t for t, ok in zip(traffic, fits, strict=True) if not ok], marker="x", ls="",
              color="0.6", label="block does not fit on chip")
    chosen = bounds.flash_attention_blocks(fast_bytes, d, elem_bytes)
    ax_b.plot([chosen.block_c], [bounds.flash_attention_traffic_bytes(
        n, d, chosen.block_r, chosen.block_c, elem_bytes, batch_heads)], marker="*", ms=10,
        color="k", ls="", label=f"FlashAttention rule: Bc={chosen.block_c}, Br={chosen.block_r}")
    for value, label, style in ((lower, "IO lower bound", "--"), (unfused, "standard attention",
                                "-."), (compulsory, "compulsory 4Nd", ":")):
        ax_b.axhline(value, ls=style, lw=1.2, color="C3" if style == "--" else "0.4",
                     label=f"{label} ({fmt_bytes(value)})")
    ax_b.set_xscale("log", base=2)
    ax_b.set_yscale("log")
    ax_b.set_xlabel("KV block size Bc (rows)")
    ax_b.set_ylabel("traffic to slow memory (bytes)")
    ax_b.set_title(f"N={n}, d={d}, {fmt_bytes(fast_bytes)} on chip", fontsize=10)
    ax_b.legend(fontsize=7)
    ax_b.grid(True, which="both", alpha=0.2)

    smallest = (3 * d + 1) * elem_bytes
    caps = [2 ** i for i in range(max(smallest - 1, 1).bit_length(), 27)]
    flash = [bounds.flash_attention_traffic_bytes(
        n, d, *bounds.flash_attention_blocks(c, d, elem_bytes)[:2], elem_bytes, batch_heads)
        for c in caps]
    ax_m.plot(caps, flash, marker="o", ms=3, label="FlashAttention-1, its block rule")
    ax_m.plot(caps, [bounds.attention_io_lower_bound_bytes(n, d, c, elem_bytes, batch_heads)
                     for c in caps], ls="--", color="C3", label="IO lower bound")
    ax_m.axhline(unfused, ls="-.", color="0.4", label="standard attention")
    ax_m.axhline(compulsory, ls=":", color="0.4", label="compulsory 4Nd")
    ax_m.axvline(d * d * elem_bytes, color="C2", lw=0.8, label="M = d² (bound changes regime)")
    for name in targets:
        scratch = load_target(name).scratch_tier
        if scratch is None:
            continue
        per_unit = scratch.capacity_bytes // max(load_target(name).units, 1)
        ax_m.axvline(per_unit, color="0.7", lw=0.8)
        ax_m.annotate(name, (per_unit, compulsory), rotation=90, fontsize=7, va="bottom")
    ax_m.set_xscale("log", base=2)
    ax_m.set_yscale("log")
    ax_m.set_xlabel("on-chip capacity per core (bytes)")
    ax_m.set_ylabel("traffic to slow memory (bytes)")
    ax_m.set_title("traffic vs on-chip capacity", fontsize=10)
    ax_m.legend(fontsize=7)
    ax_m.grid(True, which="both", alpha=0.2)
    return fig


# --- cost-model fidelity --------------------------------------------------------------------------


def fidelity(result: CheckResult, title: str | None = None) -> Figure:
    """Predicted against measured seconds per case of a fidelity check (log-log), every repeat,
    with the line of equality and the 2x band (`tiermap calibrate --check --plot`)."""
    import numpy as np

    fig = new_figure(7.0, 6.5)
    ax = fig.add_subplot()
    predicted = [p.time_s for p in result.predictions]
    for r, (run, marker) in enumerate(zip(result.measured_s, "oxs^", strict=False)):
        ax.scatter(run, predicted, marker=marker, label=f"repeat {r + 1}", alpha=0.8)
    for case, pred, meas in zip(result.cases, predicted, result.measured_s[0], strict=True):
        ax.annotate(case.label, (meas, pred), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    low = min(min(predicted), *(min(r) for r in result.measured_s)) / 2
    high = max(max(predicted), *(max(r) for r in result.measured_s)) * 2
    grid = np.geomspace(low, high, 10)
    ax.plot(grid, grid, "k-", lw=0.8, label="predicted = measured")
    ax.plot(grid, grid * 2, "k:", lw=0.6, label="2x off")
    ax.plot(grid, grid / 2, "k:", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (s)")
    ax.set_ylabel("predicted (s)")
    first = result.stats[0]
    ax.set_title(title or (f"cost model vs measured, {result.suite} suite: median |log2 err| "
                           f"{first.median_abs_log2:.2f}, Spearman {first.spearman:.3f} "
                           "(repeat 1)"), fontsize=9)
    ax.legend(fontsize=8)
    return fig


# --- all of them ---------------------------------------------------------------------------------

PLOT_FILES = ("roofline.png", "occupancy.png", "timeline.png", "traffic.png")


def save_plots(plan: Plan, out_dir: str | os.PathLike[str],
               compare: Mapping[str, Plan] | None = None) -> dict[str, Path]:
    """Write roofline.png, occupancy.png, timeline.png and traffic.png into `out_dir`, and
    loop_OP.png (one iteration, `loop_iteration`) for each loop of the plan.

    `compare` adds other plans of the same program (e.g. {"naive": ..., "greedy": ...}) to the
    traffic chart; without it, the chart shows this plan alone.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    plans = dict(compare or {})
    plans.setdefault(plan.strategy, plan)
    makers: dict[str, Callable[[], Figure]] = {
        "roofline.png": lambda: roofline(plan),
        "occupancy.png": lambda: occupancy(plan),
        "timeline.png": lambda: placement_timeline(plan),
        "traffic.png": lambda: traffic_comparison(plans),
    }
    for loop in plan.loops:  # one steady-state iteration of each loop
        makers[f"loop_{loop.op_id}.png"] = functools.partial(loop_iteration, plan, loop.op_id)
    return {name: save_figure(make(), folder / name) for name, make in makers.items()}


__all__ = [
    "PLOT_FILES", "attention_traffic", "fidelity", "loop_iteration", "new_figure", "occupancy",
    "placement_timeline",
    "png_base64", "png_bytes", "roofline", "save_figure", "save_plots", "tier_colours",
    "traffic_comparison",
]
