"""Plan summaries: per-tier tables, costliest tensors, markdown reports and notebook HTML.

Everything here reads a `Plan` (see `tiermap.ir.plan` for its semantics) and returns data or
text; nothing is printed. Transfer times come from the cost model (`costmodel.roofline`), plan
queries (occupancy, the usable tier) from `ir.plan`, units and HTML tables from `formatting`.
The CLI prints `rich_summary(plan)`; notebooks show `plan_html(plan)`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tiermap import plots as plots_module
from tiermap.costmodel.roofline import transfer_time_s
from tiermap.formatting import (
    fmt_bytes,
    fmt_flops_per_s,
    fmt_rate_bytes_per_s,
    fmt_time_s,
    html_table,
)
from tiermap.ir.decisions import Decision, decision_counts
from tiermap.ir.plan import occupancy_bytes, tier_at_step, usable_tier

if TYPE_CHECKING:
    from rich.console import RenderableType

    from tiermap.hardware.target import Target
    from tiermap.ir.plan import Plan, Transfer

# --- views of a plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TierRow:
    """One line of the per-tier table."""

    name: str
    capacity_bytes: int
    per_unit: bool
    holds_tensors: bool
    peak_bytes: int
    traffic_bytes: float
    time_s: float

    @property
    def peak_fraction(self) -> float:
        return self.peak_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


def tier_rows(plan: Plan) -> list[TierRow]:
    """Capacity, peak occupancy, traffic and traffic time (at read bandwidth) of every tier."""
    occupancy = occupancy_bytes(plan)
    rows = []
    for tier in plan.target.tiers:
        traffic = float(plan.traffic_bytes.get(tier.name, 0.0))
        rate = tier.read_bytes_per_s
        rows.append(TierRow(
            name=tier.name, capacity_bytes=tier.capacity_bytes, per_unit=tier.per_unit,
            holds_tensors=tier.holds_tensors,
            peak_bytes=max(occupancy.get(tier.name, [0]), default=0),
            traffic_bytes=traffic, time_s=traffic / rate if rate > 0 else 0.0,
        ))
    return rows


@dataclass(frozen=True)
class TensorCost:
    """A tensor and the memory time its reads, writes and transfers take on the plan's tiers."""

    id: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    tiers: tuple[str, ...]
    memory_time_s: float
    transfer_bytes: int


def tensor_costs(plan: Plan) -> list[TensorCost]:
    """Every materialized tensor's memory time, costliest first.

    Memory time = each read at its usable tier's read bandwidth + the write at its tier's write
    bandwidth + its transfers at link bandwidth. It ranks tensors; steps overlap, so it is not
    additive into `predicted_time_s`.
    """
    tiers = {t.name: t for t in plan.target.tiers}
    by_id = {t.id: t for t in plan.tensors}
    time_s: dict[str, float] = {t.id: 0.0 for t in plan.tensors if t.materialized}
    own: dict[str, list[Transfer]] = {}
    for x in plan.transfers:
        own.setdefault(x.tensor, []).append(x)
    for op in plan.ops:
        for tid in dict.fromkeys(op.inputs):
            tensor = by_id.get(tid)
            if tensor is None or not tensor.materialized:
                continue
            name = usable_tier(plan, tensor, op.step, own.get(tid, []))
            if name in tiers and tiers[name].read_bytes_per_s > 0:
                time_s[tid] += tensor.nbytes / tiers[name].read_bytes_per_s
        for tid in op.outputs:
            tensor = by_id.get(tid)
            if tensor is None or not tensor.materialized:
                continue
            name = tier_at_step(tensor, op.step)
            if name in tiers and tiers[name].write_bytes_per_s > 0:
                time_s[tid] += tensor.nbytes / tiers[name].write_bytes_per_s
    moved: dict[str, int] = {}
    for x in plan.transfers:
        if x.tensor in time_s:
            time_s[x.tensor] += transfer_time_s(x.bytes, x.src, x.dst, plan.target)
            moved[x.tensor] = moved.get(x.tensor, 0) + x.bytes
    out = [
        TensorCost(id=t.id, shape=tuple(t.shape), dtype=t.dtype, nbytes=t.nbytes,
                   tiers=tuple(dict.fromkeys(r.tier for r in t.residency)),
                   memory_time_s=time_s[t.id], transfer_bytes=moved.get(t.id, 0))
        for t in plan.tensors if t.materialized
    ]
    out.sort(key=lambda c: (-c.memory_time_s, -c.nbytes, c.id))
    return out


@dataclass(frozen=True)
class GroupRow:
    """A fusion group: its kind (from the tiling choice if tiled), ops and tile parameters."""

    group: str
    num_ops: int
    kinds: tuple[str, ...]
    predicted_time_s: float
    tile_kind: str = ""
    params: Mapping[str, int] | None = None
    traffic_bytes: float | None = None
    lower_bound_bytes: float | None = None
    reference_bytes: float | None = None


def group_rows(plan: Plan) -> list[GroupRow]:
    """Fusion groups with more than one op, plus tiled groups, in schedule order."""
    ops_by_group: dict[str, list[Any]] = {}
    for op in sorted(plan.ops, key=lambda o: o.step):
        if op.fusion_group:
            ops_by_group.setdefault(op.fusion_group, []).append(op)
    tiles = {c.group: c for c in plan.tiles}
    rows = []
    for group, ops in ops_by_group.items():
        tile = tiles.get(group)
        if len(ops) < 2 and tile is None:
            continue
        kinds = tuple(dict.fromkeys(o.kind.split(".")[-1] for o in ops))
        rows.append(GroupRow(
            group=group, num_ops=len(ops), kinds=kinds,
            predicted_time_s=sum(o.predicted_time_s for o in ops),
            tile_kind=tile.kind if tile else "", params=dict(tile.params) if tile else None,
            traffic_bytes=tile.traffic_bytes if tile else None,
            lower_bound_bytes=tile.lower_bound_bytes if tile else None,
            reference_bytes=tile.reference_bytes if tile else None,
        ))
    ops_by_id = {o.id: o for o in plan.ops}
    for group, tile in tiles.items():
        if group not in ops_by_group:  # a lone op tiled on its own: the group is named by the op
            lone = [ops_by_id[group]] if group in ops_by_id else []
            rows.append(GroupRow(group=group, num_ops=len(lone),
                                 kinds=tuple(o.kind.split(".")[-1] for o in lone),
                                 predicted_time_s=sum(o.predicted_time_s for o in lone),
                                 tile_kind=tile.kind, params=dict(tile.params),
                                 traffic_bytes=tile.traffic_bytes,
                                 lower_bound_bytes=tile.lower_bound_bytes,
                                 reference_bytes=tile.reference_bytes))
    return rows


def comparison_rows(plan: Plan) -> list[tuple[str, float | None]]:
    """(label, seconds) for naive, greedy, this plan and the lower bound, in that order."""
    rows: list[tuple[str, float | None]] = []
    for name in ("naive", "greedy"):
        if name in plan.baselines and name != plan.strategy:
            rows.append((name, float(plan.baselines[name])))
    rows.append((f"{plan.strategy} (this plan)", plan.predicted_time_s))
    rows.append(("lower bound", plan.lower_bound_s))
    return rows


def solver_line(plan: Plan) -> str:
    """"optimal (highs, gap 0.00%, 1.4 s of 30 s)" and the like."""
    s = plan.solver
    parts = [s.backend]
    if s.gap is not None and math.isfinite(s.gap):
        parts.append(f"gap {100 * s.gap:.2f}%")
    limit = f" of {s.time_limit_s:.3g} s" if s.time_limit_s else ""
    parts.append(f"{s.wall_s:.2f} s{limit}")
    line = f"{s.status} ({', '.join(parts)})"
    redundant = s.detail.strip().lower() in ("", s.status.lower(), f"solver status {s.status}")
    return line if redundant else f"{line}: {s.detail}"


def plan_summary(plan: Plan, outputs: Mapping[str, str] | None = None,
                 decisions: Sequence[Decision] | None = None) -> dict[str, Any]:
    """A small machine-readable summary (the CLI's `--json`): times, tiers, solver, outputs, and
    with `decisions` (default: the plan's own, `Plan.decisions`, where it has them) the plan
    decisions as applied."""
    if decisions is None and plan.decisions:
        decisions = plan.decisions
    return {
        "schema": "tiermap.summary/v1",
        "program": {"name": plan.program_name, "num_steps": plan.num_steps,
                    "num_tensors": len(plan.tensors)},
        "target": plan.target.name,
        "strategy": plan.strategy,
        "predicted_time_s": plan.predicted_time_s,
        "lower_bound_s": plan.lower_bound_s,
        "baselines": dict(plan.baselines),
        "traffic_bytes": dict(plan.traffic_bytes),
        "tiers": [
            {"name": r.name, "capacity_bytes": r.capacity_bytes, "peak_bytes": r.peak_bytes,
             "traffic_bytes": r.traffic_bytes, "time_s": r.time_s,
             "holds_tensors": r.holds_tensors}
            for r in tier_rows(plan)
        ],
        "solver": {"backend": plan.solver.backend, "status": plan.solver.status,
                   "gap": plan.solver.gap, "wall_s": plan.solver.wall_s,
                   "time_limit_s": plan.solver.time_limit_s},
        "tiles": [{"group": c.group, "kind": c.kind, "params": dict(c.params),
                   "traffic_bytes": c.traffic_bytes, "lower_bound_bytes": c.lower_bound_bytes}
                  for c in plan.tiles],
        "loops": [{"op_id": x.op_id, "trips": x.trips, "static_trips": x.static_trips,
                   "time_s": x.time_s, "iteration_s": x.iteration_s,
                   "body_time_s": x.body_time_s, "body_steps": x.body.num_steps}
                  for x in plan.loops],
        "warnings": list(plan.warnings),
        **({"sharding": sharding_summary(plan)} if plan.sharding else {}),
        **({"decisions": [d.to_dict() for d in decisions]} if decisions is not None else {}),
        "outputs": dict(outputs or {}),
    }


def sharding_summary(plan: Plan) -> dict[str, Any]:
    """A sharded plan's devices, step time with communication and link traffic per kind."""
    sp = plan.sharding
    assert sp is not None
    return {"num_devices": sp.num_devices, "interconnect": sp.interconnect,
            "topology": sp.topology, "argument_bytes": sp.argument_bytes,
            "output_bytes": sp.output_bytes, "step_time_s": sp.step_time_s,
            "compute_s": sp.compute_s, "comm_s": sp.comm_s,
            "exposed_comm_s": sp.exposed_comm_s, "overlap_fraction": sp.overlap_fraction,
            "collectives": [{"kind": r[0], "count": r[1], "payload_bytes": r[2],
                             "wire_bytes": r[3], "time_s": r[4], "hidden_s": r[5]}
                            for r in collective_rows(plan)]}


def collective_rows(plan: Plan) -> list[tuple[str, int, int, float, float, float]]:
    """Per collective kind: (kind, count, payload bytes, wire bytes per device, link time,
    time hidden under compute), in order of link time."""
    by_kind: dict[str, list[float]] = {}
    for c in plan.sharding.collectives if plan.sharding else ():
        row = by_kind.setdefault(c.kind, [0, 0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += c.payload_bytes
        row[2] += c.wire_bytes
        row[3] += c.time_s
        row[4] += c.hidden_s
    rows = [(k, int(v[0]), int(v[1]), v[2], v[3], v[4]) for k, v in by_kind.items()]
    return sorted(rows, key=lambda r: (-r[4], r[0]))


def _sharding_lines(plan: Plan, top: int = 10) -> list[str]:
    """The devices section: per-device memory, link traffic per collective, overlap."""
    sp = plan.sharding
    if sp is None:
        return []
    lines = ["## Devices and interconnect", "",
             f"- {sp.num_devices} devices over {sp.interconnect} ({sp.topology}); every device "
             "runs this per-device program (SPMD), so the tier table above is one device's",
             f"- per device: arguments {fmt_bytes(sp.argument_bytes)}, outputs "
             f"{fmt_bytes(sp.output_bytes)}",
             f"- step time with communication: **{fmt_time_s(sp.step_time_s)}** = compute "
             f"{fmt_time_s(sp.compute_s)} + exposed communication "
             f"{fmt_time_s(sp.exposed_comm_s)}; communication {fmt_time_s(sp.comm_s)}, "
             f"{100 * sp.overlap_fraction:.0f}% of it hidden under compute", ""]
    rows = [[kind, str(n), fmt_bytes(payload), fmt_bytes(wire), fmt_time_s(t),
             f"{100 * hidden / t:.0f}%" if t > 0 else "-"]
            for kind, n, payload, wire, t, hidden in collective_rows(plan)]
    lines += _md_table(["collective", "count", "payload", "link bytes per device", "link time",
                        "hidden"], rows, align="lrrrrr")
    costly = sorted(sp.collectives, key=lambda c: (-c.time_s, c.op_id))[:top]
    lines += ["", f"The {len(costly)} longest of {len(sp.collectives)} collectives:", ""]
    crows = [[f"`{c.op_id}`", c.kind, f"{c.num_groups}x{c.group_size}",
              fmt_bytes(c.payload_bytes), fmt_time_s(c.time_s), fmt_time_s(c.start_s),
              f"{100 * c.hidden_s / c.time_s:.0f}%" if c.time_s > 0 else "-"] for c in costly]
    lines += _md_table(["op", "kind", "groups x devices", "payload", "link time", "starts at",
                        "hidden"], crows, align="llrrrrr")
    lines.append("")
    return lines


# --- tables for notebooks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A small table that prints as markdown and shows as HTML in notebooks."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    title: str = ""
    align: str = ""  # one of l/r/c per column; default: first left, the rest right

    def __str__(self) -> str:
        lines = [f"**{self.title}**", ""] if self.title else []
        return "\n".join(lines + _md_table(self.header, self.rows, self.align))

    def _repr_html_(self) -> str:
        caption = f"<p><b>{html.escape(self.title)}</b></p>" if self.title else ""
        return caption + html_table(self.header, self.rows)

    def _repr_markdown_(self) -> str:
        return str(self)


def target_table(target: Target) -> Table:
    """A target's tiers (fastest first): capacity, bandwidths and role, and its compute peaks."""
    rows = []
    for tier in target.tiers:
        role = ("weights only" if tier.read_only else
                "residency" if tier.holds_tensors else "tile scratch")
        if tier.per_unit:
            role += f", {fmt_bytes(tier.capacity_bytes / max(target.units, 1))} per unit"
        rows.append((tier.name, fmt_bytes(tier.capacity_bytes),
                     fmt_rate_bytes_per_s(tier.read_bytes_per_s),
                     fmt_rate_bytes_per_s(tier.write_bytes_per_s), role))
    peaks = ", ".join(f"{k} {fmt_flops_per_s(v)}" for k, v in target.peak_flops_per_s.items())
    return Table(("tier", "capacity", "read", "write", "role"), tuple(rows),
                 title=f"{target.name}: {target.units} units; peak {peaks}", align="lrrrl")


def compare(plans: Mapping[str, Plan] | Sequence[Plan]) -> Table:
    """One row per plan: target, strategy, predicted time, lower bound, baselines, traffic.

    Keys of a mapping label the rows (e.g. {"h100": ..., "sn40l": ...}); a sequence is labelled
    by "target/strategy".
    """
    named = dict(plans) if isinstance(plans, Mapping) else {
        f"{p.target.name}/{p.strategy}": p for p in plans}
    rows = []
    for label, p in named.items():
        traffic = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.traffic_bytes.items() if v)
        rows.append((label, p.target.name, p.strategy, fmt_time_s(p.predicted_time_s),
                     fmt_time_s(p.lower_bound_s), _ratio(p.predicted_time_s, p.lower_bound_s),
                     fmt_time_s(p.baselines.get("naive")), fmt_time_s(p.baselines.get("greedy")),
                     traffic or "-"))
    return Table(("plan", "target", "strategy", "predicted", "lower bound", "vs bound",
                  "naive", "greedy", "traffic"), tuple(rows), title="Plans compared",
                 align="lllrrrrrl")


def residency_table(plan: Plan, top_tensors: int = 15) -> Table:
    """Where the largest tensors live: bytes, tiers over their live range, steps in each tier."""
    rows = []
    tensors = sorted((t for t in plan.tensors if t.materialized),
                     key=lambda t: (-t.nbytes, max(t.producer_step, 0), t.last_use_step,
                                    t.id))[:top_tensors]
    for t in tensors:
        steps: dict[str, int] = {}
        for r in t.residency:
            steps[r.tier] = steps.get(r.tier, 0) + r.to_step - r.from_step + 1
        live = max(t.last_use_step - max(t.producer_step, 0) + 1, 1)
        where = ", ".join(f"{k} {100 * v / live:.0f}%" for k, v in steps.items())
        role = "input" if t.producer_step < 0 else f"made at step {t.producer_step}"
        rows.append((t.id, _shape(t.shape, t.dtype), fmt_bytes(t.nbytes), role,
                     f"{max(t.producer_step, 0)}–{t.last_use_step}", where or "-"))
    bytes_by_tier: dict[str, int] = {}
    for t in plan.tensors:
        if t.materialized and t.residency:
            first = t.residency[0].tier
            bytes_by_tier[first] = bytes_by_tier.get(first, 0) + t.nbytes
    title = (f"The {len(rows)} largest tensors of {plan.program_name} on {plan.target.name} "
             "(share of each tensor's live steps spent in each tier)")
    return Table(("tensor", "type", "size", "role", "live steps", "tiers"), tuple(rows), title,
                 align="llrlll")


def tier_contents(plan: Plan, examples: int = 4) -> Table:
    """What each tier holds over the program: how many tensors (program inputs such as weights,
    and intermediates) ever reside there, their bytes, the peak, and the largest of them."""
    rows = []
    occupancy = occupancy_bytes(plan)
    for tier in plan.target.tiers:
        held = [t for t in plan.tensors if t.materialized
                and any(r.tier == tier.name for r in t.residency)]
        if not held and not tier.holds_tensors:
            continue
        inputs = [t for t in held if t.producer_step < 0]
        largest = sorted(held, key=lambda t: (-t.nbytes, max(t.producer_step, 0), t.id))
        names = ", ".join(f"{t.id} {_shape(t.shape, t.dtype)}" for t in largest[:examples])
        if len(largest) > examples:
            names += f", … ({len(largest) - examples} more)"
        rows.append((tier.name, str(len(inputs)), str(len(held) - len(inputs)),
                     fmt_bytes(sum(t.nbytes for t in held)),
                     fmt_bytes(max(occupancy.get(tier.name, [0]), default=0)),
                     fmt_bytes(tier.capacity_bytes), names or "-"))
    return Table(("tier", "inputs", "intermediates", "bytes held at some step", "peak",
                  "capacity", "largest"), tuple(rows),
                 title=f"What each tier of {plan.target.name} holds ({plan.program_name}, "
                       f"{plan.strategy})", align="lrrrrrl")


def tiles_table(plan: Plan) -> Table:
    """The tiled fusion groups: block sizes, traffic, the IO lower bound and a reference."""
    rows = []
    for c in plan.tiles:
        params = ", ".join(f"{k}={v}" for k, v in c.params.items())
        rows.append((c.group, c.kind, params, fmt_bytes(c.traffic_bytes),
                     fmt_bytes(c.lower_bound_bytes), _ratio(c.traffic_bytes, c.lower_bound_bytes),
                     fmt_bytes(c.reference_bytes) if c.reference_bytes is not None else "-",
                     c.reference or "-"))
    return Table(("group", "kind", "tile", "traffic", "lower bound", "vs bound", "reference",
                  "reference is"), tuple(rows), title=f"Tiled groups of {plan.program_name} on "
                 f"{plan.target.name}", align="lllrrrrl")


# --- markdown ------------------------------------------------------------------------------------


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ratio(time_s: float | None, best_s: float) -> str:
    if time_s is None or best_s <= 0:
        return "-"
    return f"{time_s / best_s:.2f}×"


def _shape(shape: Sequence[int], dtype: str) -> str:
    return f"{dtype}[{','.join(str(d) for d in shape)}]"


def plan_report(plan: Plan, top_tensors: int = 10, top_groups: int = 12,
                decisions: Sequence[Decision] | None = None,
                compiled_memory: str | None = None) -> str:
    """A markdown report: program, target, solver, predicted times against the baselines and the
    lower bound, the per-tier table, the costliest tensors and the fusion/tiling groups; with
    `decisions` (`tiermap.apply`'s record of the program as applied), which plan decisions the
    applied program realises and which not, with the reason (default: the plan's own,
    `Plan.decisions`, where it has them)."""
    if decisions is None and plan.decisions:
        decisions = plan.decisions
    lines = [f"# tiermap plan: {plan.program_name} on {plan.target.name}", ""]
    lines += [
        f"- program: `{plan.program_name}`, {plan.num_steps} steps, {len(plan.tensors)} tensors",
        f"- target: `{plan.target.name}` — {plan.target.description}".rstrip(" —"),
        f"- strategy: `{plan.strategy}`; solver: {solver_line(plan)}",
        f"- predicted time: **{fmt_time_s(plan.predicted_time_s)}**"
        f" (lower bound {fmt_time_s(plan.lower_bound_s)})",
        "",
        "## Predicted time",
        "",
    ]
    rows = [[label, fmt_time_s(t), _ratio(t, plan.predicted_time_s),
             _ratio(t, plan.lower_bound_s)] for label, t in comparison_rows(plan)]
    lines += _md_table(["plan", "predicted time", "vs this plan", "vs lower bound"], rows)
    lines += ["", "## Tiers", ""]
    trows = []
    for r in tier_rows(plan):
        role = "residency" if r.holds_tensors else ("scratch (per unit)" if r.per_unit
                                                    else "not used")
        trows.append([r.name, role, fmt_bytes(r.capacity_bytes), fmt_bytes(r.peak_bytes),
                      f"{100 * r.peak_fraction:.1f}%", fmt_bytes(r.traffic_bytes),
                      fmt_time_s(r.time_s)])
    lines += _md_table(["tier", "role", "capacity", "peak occupancy", "peak / capacity",
                        "traffic", "traffic time"], trows, align="llrrrrr")
    lines += ["", "Traffic time is the tier's traffic at its read bandwidth.", ""]
    costs = tensor_costs(plan)[:top_tensors]
    if costs:
        lines += [f"## Top {len(costs)} tensors by memory time", ""]
        crows = [[f"`{c.id}`", _shape(c.shape, c.dtype), fmt_bytes(c.nbytes),
                  " → ".join(c.tiers) or "-", fmt_bytes(c.transfer_bytes),
                  fmt_time_s(c.memory_time_s)] for c in costs]
        lines += _md_table(["tensor", "type", "size", "tiers", "transferred", "memory time"],
                           crows, align="llrlrr")
        lines += ["", "Memory time: its reads, writes and transfers at the bandwidths of the tiers "
                  "it sits in (steps overlap, so these do not add up to the predicted time).", ""]
    groups = group_rows(plan)
    if groups:
        lines += ["## Fusion and tiling groups", ""]
        by_kind: dict[str, list[GroupRow]] = {}
        for g in groups:
            by_kind.setdefault(g.tile_kind or "fused", []).append(g)
        krows = []
        for kind, rows_of_kind in by_kind.items():
            tiled = [g for g in rows_of_kind if g.traffic_bytes is not None]
            krows.append([kind, str(len(rows_of_kind)), str(sum(g.num_ops for g in rows_of_kind)),
                          fmt_time_s(sum(g.predicted_time_s for g in rows_of_kind)),
                          fmt_bytes(sum(g.traffic_bytes or 0.0 for g in tiled)) if tiled else "-",
                          fmt_bytes(sum(g.lower_bound_bytes or 0.0 for g in tiled))
                          if tiled else "-"])
        lines += _md_table(["kind", "groups", "ops", "predicted time", "tiled traffic",
                            "traffic lower bound"], krows, align="lrrrrr")
        costly = sorted(groups, key=lambda g: (-g.predicted_time_s, g.group))[:top_groups]
        lines += ["", f"The {len(costly)} costliest of {len(groups)} groups:", ""]
        grows = []
        for g in costly:
            params = ", ".join(f"{k}={v}" for k, v in (g.params or {}).items()) or "-"
            grows.append([f"`{g.group}`", g.tile_kind or "fused", str(g.num_ops),
                          fmt_time_s(g.predicted_time_s), params,
                          fmt_bytes(g.traffic_bytes) if g.traffic_bytes is not None else "-",
                          fmt_bytes(g.lower_bound_bytes)
                          if g.lower_bound_bytes is not None else "-"])
        lines += _md_table(["group", "kind", "ops", "predicted time", "tile", "traffic",
                            "traffic lower bound"], grows, align="llrrlrr")
        lines.append("")
    transfers = len(plan.transfers)
    if transfers:
        moved = sum(x.bytes for x in plan.transfers)
        lines += [f"{transfers} transfers move {fmt_bytes(moved)} between tiers.", ""]
    lines += _loop_lines(plan)
    if decisions is not None:
        lines += decision_lines(decisions)
    if compiled_memory is not None:
        lines += ["## Predicted against compiled", "",
                  "The plan's peak device memory against XLA's `memory_analysis()` of the "
                  "program as applied, compiled on this machine "
                  "(tiermap/apply/compiled_memory.py):",
                  "", f"- {compiled_memory}", ""]
    if plan.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in plan.warnings] + [""]
    lines += _sharding_lines(plan)
    notes = list(plan.notes)
    if plan.program is not None:
        notes += list(plan.program.assumptions)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines).rstrip() + "\n"


def decision_lines(decisions: Sequence[Decision]) -> list[str]:
    """The report's section listing each plan decision as the applied program has it."""
    lines = ["## Plan decisions as applied", ""]
    if not decisions:
        return lines + ["The plan makes no decision that the applied program has to realise "
                        "(no tiled attention, no host placement).", ""]
    counts = decision_counts(decisions)
    lines += _md_table(["decision", "applied", "not applied"],
                       [[kind, str(done), str(left)] for kind, (done, left) in counts.items()],
                       align="lrr")
    lines += [""]
    dropped = [d for d in decisions if not d.priced]
    if dropped:
        lines += [f"{len(dropped)} decision(s) an earlier plan made are not realised by the "
                  "applied program; the plan was made again without them and its prediction "
                  "does not count them (tiermap/as_run.py).", ""]
    lines += _md_table(["decision", "subject", "applied", "in the prediction", "how, or why not"],
                       [[d.kind, f"`{d.subject}`", "yes" if d.applied else "**no**",
                         "yes" if d.priced else "no (planned without it)",
                         d.detail.replace("|", "/")] for d in decisions], align="lllll")
    return lines + [""]


def _loop_lines(plan: Plan, depth: int = 0) -> list[str]:
    """The loops section: each loop as prologue + trips × steady-state iteration + epilogue, and
    its iteration expanded (its costliest ops), nested loops below their loop."""
    if not plan.loops:
        return []
    head = "#" * min(2 + depth, 4)
    lines = [f"{head} Loops{' of the body' if depth else ''}", ""]
    rows = []
    for loop in plan.loops:
        trips = f"{loop.trips}" + ("" if loop.static_trips else " (assumed)")
        op = next((o for o in plan.ops if o.id == loop.op_id), None)
        moved = (sum((loop.operand_bytes or {}).values())
                 + sum((loop.result_bytes or {}).values()))
        rows.append([f"`{loop.op_id}`", trips, fmt_time_s(loop.time_s),
                     fmt_time_s(op.predicted_time_s) if op is not None else "-",
                     fmt_time_s(loop.iteration_s), fmt_time_s(loop.body_time_s),
                     fmt_time_s(loop.stream_s), fmt_time_s(loop.back_edge_s),
                     fmt_bytes(moved), str(loop.body.num_steps),
                     ", ".join(f"{t} {fmt_bytes(b)}" for t, b in loop.reserved_bytes.items()
                               if b) or "-"])
    lines += _md_table(["loop", "trips", "loop time", "op time", "iteration", "body",
                        "stream", "back edge", "operands moved", "body steps", "reserved"],
                       rows, align="lrrrrrrrrrl")
    lines += ["", "loop time = trips × iteration; iteration = body + back edge; op time = "
              "max(loop time, operands moved / their tiers' bandwidth) + overhead (the stacks "
              "stream slice by slice during the iterations, double-buffered; stream: one "
              "iteration's slice moves over the links).", ""]
    paired = [n for n in plan.notes if "attention forward in" in n]
    if paired:
        lines += [f"- {n}" for n in paired] + [""]
    for loop in plan.loops:
        body = loop.body
        roles = ", ".join(f"{j}: {r}" for j, r in enumerate(loop.roles))
        lines += [f"One iteration of `{loop.op_id}` ({body.num_steps} steps; operands {roles}; "
                  f"{len(body.attention)} attention groups, {len(body.tiles)} tiled groups):", ""]
        costly = sorted(body.ops, key=lambda o: (-o.predicted_time_s, o.step))[:5]
        orows = [[f"`{o.id}`", loop.source_op_ids.get(o.id, "-"), o.kind.split(".")[-1],
                  o.fusion_group or "-", fmt_time_s(o.predicted_time_s)] for o in costly]
        lines += _md_table(["op", "in the program", "kind", "group", "time"], orows,
                           align="lllll")
        lines.append("")
        lines += _loop_lines(body, depth + 1)
    return lines


# --- rich (terminal) -----------------------------------------------------------------------------


def rich_summary(plan: Plan) -> RenderableType:
    """The CLI's summary: predicted times against baselines and bound, and the per-tier table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text.assemble(
        ("tiermap plan ", "bold"), (plan.program_name, "bold cyan"), " on ",
        (plan.target.name, "bold cyan"), f" · {plan.num_steps} steps · {len(plan.tensors)} "
        f"tensors\nstrategy {plan.strategy} · solver {solver_line(plan)}",
    )
    times = Table(title="Predicted time", title_justify="left", show_edge=False)
    times.add_column("plan")
    times.add_column("predicted time", justify="right")
    times.add_column("vs this plan", justify="right")
    times.add_column("vs lower bound", justify="right")
    for label, t in comparison_rows(plan):
        times.add_row(label, fmt_time_s(t), _ratio(t, plan.predicted_time_s),
                      _ratio(t, plan.lower_bound_s))
    tiers = Table(title="Tiers", title_justify="left", show_edge=False)
    for col, just in (("tier", "left"), ("role", "left"), ("capacity", "right"),
                      ("peak occupancy", "right"), ("peak/cap", "right"),
                      ("traffic", "right"), ("traffic time", "right")):
        tiers.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in tier_rows(plan):
        role = "residency" if r.holds_tensors else ("scratch" if r.per_unit else "-")
        tiers.add_row(r.name, role, fmt_bytes(r.capacity_bytes), fmt_bytes(r.peak_bytes),
                      f"{100 * r.peak_fraction:.1f}%", fmt_bytes(r.traffic_bytes),
                      fmt_time_s(r.time_s))
    parts: list[Any] = [head, times, tiers]
    groups = group_rows(plan)
    tiled = [g for g in groups if g.tile_kind]
    if groups:
        parts.append(Text(f"{len(groups)} fusion groups, {len(tiled)} tiled"))
    if plan.sharding is not None:
        sp = plan.sharding
        traffic = ", ".join(f"{kind} {n}x {fmt_bytes(payload)}"
                            for kind, n, payload, _, _, _ in collective_rows(plan))
        parts.append(Text(
            f"{sp.num_devices} devices ({sp.interconnect}): step {fmt_time_s(sp.step_time_s)} "
            f"with communication (compute {fmt_time_s(sp.compute_s)}, communication "
            f"{fmt_time_s(sp.comm_s)}, {100 * sp.overlap_fraction:.0f}% hidden); "
            f"per device arguments {fmt_bytes(sp.argument_bytes)}; {traffic}"))
    for loop in plan.loops:
        body = loop.body
        trips = f"{loop.trips}{'' if loop.static_trips else ' (assumed)'}"
        parts.append(Text(
            f"loop {loop.op_id}: {trips} trips × {fmt_time_s(loop.iteration_s)} per iteration "
            f"(body {fmt_time_s(loop.body_time_s)}, stream {fmt_time_s(loop.stream_s)})"
            + (f" + prologue/epilogue {fmt_time_s(loop.prologue_s + loop.epilogue_s)}"
               if loop.prologue_s or loop.epilogue_s else "")
            + f" = {fmt_time_s(loop.time_s)}; body {body.num_steps} steps, "
            f"{len(body.attention)} attention, {len(body.tiles)} tiled groups"))
    for warning in plan.warnings:
        parts.append(Text(f"warning: {warning}", style="bold yellow"))
    return Group(*parts)


# --- HTML (notebooks) ----------------------------------------------------------------------------


def plan_html(plan: Plan, plots: bool = True) -> str:
    """HTML for notebooks: the summary tables and, with `plots`, the charts as inline PNGs."""
    parts = [f"<h4>tiermap plan: {html.escape(plan.program_name)} on "
             f"{html.escape(plan.target.name)}</h4>",
             f"<p>{plan.num_steps} steps, {len(plan.tensors)} tensors; strategy "
             f"<code>{html.escape(plan.strategy)}</code>; solver "
             f"{html.escape(solver_line(plan))}</p>"]
    parts.append(html_table(
        ["plan", "predicted time", "vs this plan", "vs lower bound"],
        [[label, fmt_time_s(t), _ratio(t, plan.predicted_time_s), _ratio(t, plan.lower_bound_s)]
         for label, t in comparison_rows(plan)]))
    parts.append(html_table(
        ["tier", "capacity", "peak occupancy", "traffic", "traffic time"],
        [[r.name, fmt_bytes(r.capacity_bytes), fmt_bytes(r.peak_bytes),
          fmt_bytes(r.traffic_bytes), fmt_time_s(r.time_s)] for r in tier_rows(plan)]))
    if plots and plan.num_steps > 0:
        for make in (plots_module.roofline, plots_module.occupancy,
                     plots_module.placement_timeline):
            fig = make(plan)
            parts.append(f'<img src="data:image/png;base64,{plots_module.png_base64(fig)}"/>')
    return "\n".join(parts)
