"""Package an evaluated placement as a `Plan`: the one place the strategies build their plans."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tiermap.bounds.knapsack import program_lower_bound_s
from tiermap.costmodel.evaluate import evaluate
from tiermap.hardware.target import Target
from tiermap.ir.fusion import Fusion
from tiermap.ir.plan import (
    AttentionGroupPlan,
    OpPlan,
    Plan,
    Residency,
    SolverInfo,
    TensorPlan,
    Transfer,
)
from tiermap.ir.program import Program


def build_plan(program: Program, target: Target, strategy: str,
               residency: Mapping[str, Sequence[Residency]], transfers: Sequence[Transfer],
               fusion: Fusion | None, lower_bound_s: float | None, baselines: Mapping[str, float],
               solver: SolverInfo, notes: Sequence[str] = ()) -> Plan:
    """Evaluate a placement and package it as a `Plan` (JSON-ready, deterministic order).

    Ops appear in step order with their fusion group ids; tensors in definition order, fused
    intermediates with `materialized=False` and no residency; residency intervals sorted by step
    and tier; transfers by (start, end, tensor, src, dst). `lower_bound_s=None` computes
    `program_lower_bound_s(program, target, fusion)`.
    """
    ev = evaluate(program, target, residency, transfers, fusion)
    if lower_bound_s is None:
        lower_bound_s = program_lower_bound_s(program, target, fusion)
    group_of = fusion.group_of() if fusion is not None else {}
    internal = (fusion.unmaterialized() if fusion is not None else frozenset()) | program.unstored
    tier_rank = {t.name: i for i, t in enumerate(target.tiers)}
    ops = tuple(
        OpPlan(
            id=op.id, kind=op.kind, step=op.step, flops=op.flops, inputs=op.inputs,
            outputs=op.outputs,
            fusion_group=group_of[op.id].id if op.id in group_of else None,
            predicted_time_s=ev.op_time_s[op.step],
            bytes_by_tier=dict(sorted(ev.op_bytes_by_tier[op.step].items(),
                                      key=lambda kv: tier_rank.get(kv[0], 0))),
            compute_time_s=ev.op_compute_s[op.step],
        )
        for op in program.ops
    )
    tensors = []
    for vid, value in program.values.items():
        materialized = vid not in internal
        intervals = residency.get(vid, ()) if materialized else ()
        tensors.append(TensorPlan(
            id=vid, shape=value.shape, dtype=value.dtype, nbytes=value.nbytes,
            producer_step=value.producer_step, last_use_step=program.last_use_step(vid),
            materialized=materialized,
            residency=tuple(sorted(intervals, key=lambda r: (r.from_step, tier_rank.get(
                r.tier, len(tier_rank)), r.to_step))),
        ))
    ordered_transfers = tuple(sorted(
        transfers, key=lambda x: (x.start_step, x.end_step, x.tensor, x.src, x.dst)))
    return Plan(
        program_name=program.name,
        num_steps=program.num_steps,
        target=target,
        strategy=strategy,
        ops=ops,
        tensors=tuple(tensors),
        transfers=ordered_transfers,
        predicted_time_s=ev.predicted_time_s,
        lower_bound_s=float(lower_bound_s),
        traffic_bytes=dict(ev.traffic_bytes),
        baselines=dict(baselines),
        solver=solver,
        tiles=fusion.tiles if fusion is not None else (),
        notes=tuple(notes),
        attention=attention_groups(program, fusion),
        recomputes=program.recomputes,
        program=program,
    )


MATMUL_KIND = "stablehlo.dot_general"


def attention_groups(program: Program, fusion: Fusion | None) -> tuple[AttentionGroupPlan, ...]:
    """The attention groups of `fusion` with the program equations each covers (see
    `AttentionGroupPlan`), in program order."""
    if fusion is None:
        return ()
    ordinal = {op.id: n for n, op in enumerate(o for o in program.ops if o.kind == MATMUL_KIND)}
    by_id = {g.id: g for g in fusion.groups}
    out = []
    for g in fusion.groups:
        if g.kind != "attention":
            continue
        matmuls = [ordinal[i] for i in g.op_ids if i in ordinal]
        if len(matmuls) < 2:
            continue
        bwd = by_id.get(f"{g.id}_bwd")
        out.append(AttentionGroupPlan(
            group=g.id, backward_group=bwd.id if bwd is not None else None,
            op_ids=tuple(g.op_ids), backward_op_ids=tuple(bwd.op_ids) if bwd is not None else (),
            matmul_ordinals=(min(matmuls), max(matmuls)), q_len=int(g.attrs.get("q_len", 0)),
            kv_len=int(g.attrs.get("kv_len", 0)), head_dim=int(g.attrs.get("head_dim", 0)),
            output=str(g.attrs.get("o", ""))))
    return tuple(sorted(out, key=lambda a: a.matmul_ordinals))
