"""The Plan: where every tensor lives at every step, what moves when, and what it costs.

Semantics (shared by the cost model, every strategy and the verifier; keep them in step):

- Steps are the ops of the schedule, run in order. A fusion group's ops keep their own steps;
  a fused intermediate (`materialized == False`) never reaches memory and has no residency.
- `TensorPlan.residency` lists intervals `[from_step, to_step]` (inclusive) in tiers. Program
  inputs are live from step 0 (`producer_step == -1`); every materialized tensor is resident
  somewhere at every step of `[max(producer_step, 0), last_use_step]`, and nowhere outside it.
- A change of tier is a `Transfer` `[start_step, end_step]` (inclusive) from `src` to `dst`,
  or a move made in chunks: transfers of the tensor from one `src` into one `dst` residency
  interval, one after another (each starts after the previous one ends), whose `bytes` add up
  to the tensor's `nbytes`; the move then spans the first chunk's `start_step` to the last's
  `end_step`. During a move the tensor occupies both tiers: the `dst` residency starts at
  `start_step`, the `src` residency lasts at least to `end_step`. The `dst` copy is usable by
  ops from `end_step + 1`; an op at step s reads its inputs from a tier where the tensor is
  usable at s (the fastest one if several). An op's outputs are written where they reside at
  the op's step, which is one writable tier (a copy elsewhere is a transfer that starts after
  that step; a constant may also have its read-only home).
- An alias op (`ALIAS_KINDS`: a reshape, an optimization barrier) returns its operands under
  another shape; XLA makes it a bitcast of the same buffer and the cost model counts it free. So
  its result i is written, at the op's step, in a tier where its operand i resides then (a copy
  into another tier would be a transfer the op does not pay for).
- A transfer's (or chunk's) time, bytes / link bandwidth, is spread evenly over its steps and
  overlaps the ops there (prefetch before a use, eviction after the last write). Step time =
  max(op time, for each link the sum of the shares of the transfers on it at that step). Op
  time = max(compute time, Σ_tier bytes_tier / bandwidth_tier) + per-op overhead (roofline).
  `predicted_time_s` = Σ steps.
- Capacity: at every step, the bytes resident in a tier fit its `capacity_bytes` (whole chip).
  Read-only tiers hold program inputs only. Tiers that are `per_unit` and not `persistent` are
  scratchpads for fused tiles, never residency.
- Loops (`Plan.loops`, schema v2): a `while` op whose body is planned is one step of the plan;
  its body has a plan of its own (`LoopPlan.body`, one steady-state iteration, steps of its own),
  and the op's compute time is the loop's time, `prologue_s + trips × iteration_s + epilogue_s`
  (tiermap/ir/loops.py says how a body is cut out; tiermap/loop_planning.py how it is priced);
  its memory traffic is what it moves of its operands (`LoopPlan.operand_bytes`, `result_bytes`:
  the xs and ys stacks slice by slice, the carries and invariants once), so its time is
  max(loop time, those bytes / bandwidth of the tiers they live in) + overhead.
  While the loop runs, each tier holds what the enclosing plan keeps there at the loop's step
  plus `LoopPlan.reserved_bytes` (the body's own peak, less the loop operands it uses in place,
  plus the second buffer of each slice streamed between tiers).
- Determinism: the same program, target and options give the same plan JSON on any machine,
  apart from keys that contain "wall" (every solver stops at a deterministic work limit). A
  solver stopped by its wall-clock guard instead says so in `Plan.warnings` (a v2 key added
  2026-12-07; plans written before it have none), and only then may the plan differ.
- Recomputation (`Plan.recomputes`, a v2 key added 2026-12-07, [] in older plans): a tensor
  dropped after its forward use is computed again by repeated ops just before its next read
  (tiermap/ir/recompute.py); the repeated ops are ordinary ops of the plan's program, priced,
  placed and verified as such, and no tier holds the tensor in between.
- Sharded programs (`Plan.sharding`, an optional "sharding" key of schema v2): the program is one
  device's program of XLA's SPMD partitioner, capacities are per device, and `ShardingPlan`
  (tiermap/ir/sharding.py) holds its collectives and the step time with communication.
- Plan as it runs (`Plan.decisions`, a v2 key added 2026-12-08, [] in older plans and in plans
  made without tracing the applied program): each decision the applied program has to realise
  (tiermap/ir/decisions.py), applied or not with the reason. `tiermap.jit` and `tiermap compile
  FILE.py:NAME` plan again without the decisions that are not applied (tiermap/as_run.py), so
  the plan's times are those of the program that runs; the notes say what was re-planned.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tiermap.errors import TiermapError
from tiermap.hardware.interconnect import Interconnect
from tiermap.hardware.target import Link, Target, Tier
from tiermap.ir.decisions import Decision
from tiermap.ir.recompute import Recompute
from tiermap.ir.sharding import ShardingPlan

if TYPE_CHECKING:
    from tiermap.ir.program import Program

SCHEMA = "tiermap.plan/v2"
# Schemas `Plan.from_json` reads: v1 (before loops) has no "loops" key.
READ_SCHEMAS = ("tiermap.plan/v1", SCHEMA)
# Ops whose result i is their operand i under another shape (see the module docstring).
ALIAS_KINDS = frozenset({"stablehlo.reshape", "stablehlo.optimization_barrier"})


def alias_pairs(kind: str, inputs: Sequence[str], outputs: Sequence[str]
                ) -> list[tuple[str, str]]:
    """(operand, result) pairs that must share a tier at an op of `kind`: none unless it is
    an alias op with as many results as operands."""
    if kind not in ALIAS_KINDS or len(inputs) != len(outputs):
        return []
    return list(zip(inputs, outputs, strict=True))


@dataclass(frozen=True)
class Residency:
    """A tensor resident in `tier` for steps `from_step..to_step` inclusive."""

    tier: str
    from_step: int
    to_step: int


@dataclass(frozen=True)
class Transfer:
    """A copy of `tensor` from `src` to `dst` running alongside steps `start_step..end_step`."""

    tensor: str
    src: str
    dst: str
    start_step: int
    end_step: int
    bytes: int


@dataclass(frozen=True)
class OpPlan:
    """One op's plan: its fusion group, predicted time and bytes moved per tier."""

    id: str
    kind: str
    step: int
    flops: float
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fusion_group: str | None
    predicted_time_s: float
    bytes_by_tier: Mapping[str, float]
    compute_time_s: float = 0.0


@dataclass(frozen=True)
class TensorPlan:
    """One tensor's plan: its live range and where it resides over it."""

    id: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    producer_step: int
    last_use_step: int
    materialized: bool
    residency: tuple[Residency, ...]


@dataclass(frozen=True)
class SolverInfo:
    """How the plan was found. `status`: optimal | feasible | greedy_fallback | heuristic."""

    backend: str
    status: str
    gap: float | None
    wall_s: float
    time_limit_s: float | None
    seed: int | None = None
    workers: int | None = None
    bound_s: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class TileChoice:
    """A tiled fusion group (attention or matmul): block sizes and traffic against bounds."""

    group: str
    kind: str
    params: Mapping[str, int]
    traffic_bytes: float
    lower_bound_bytes: float
    reference_bytes: float | None = None
    reference: str = ""


@dataclass(frozen=True)
class AttentionGroupPlan:
    """One attention the plan fuses and tiles, and the program equations it covers.

    `op_ids` (and `backward_op_ids`) are the IR ops of the forward (backward) group.
    `matmul_ordinals` are the positions of its two matmuls (Q·Kᵀ and P·V) among the program's
    top-level `dot_general` ops, in program order: the key by which `tiermap.apply` finds the
    same equations in the jaxpr it rewrites, checked against `q_len`, `kv_len`, `head_dim`.
    `group` and `backward_group` name the fusion groups, whose block sizes are in `Plan.tiles`.
    `output` is the attention's output tensor O (the key by which a plan made again without
    this attention names it, tiermap/ir/untaken.py; "" in plans written before 2026-12-08).
    """

    group: str
    backward_group: str | None
    op_ids: tuple[str, ...]
    backward_op_ids: tuple[str, ...]
    matmul_ordinals: tuple[int, int]
    q_len: int
    kv_len: int
    head_dim: int
    output: str = ""


@dataclass(frozen=True)
class LoopPlan:
    """A `while` op planned as a steady state: its body's plan, run `trips` times.

    Attributes:
        op_id: the `while` op in the enclosing plan.
        trips: iterations (static, or assumed: `static_trips` False, then `notes` say so).
        static_trips: whether the trip count was read from the program.
        roles: each loop operand's role (tiermap/ir/loops.py: counter, xs, ys, invariant, carry).
        operand_inputs: loop operand index → the body input it becomes (xs: the slice).
        operand_outputs: loop operand index → the body output that leaves it.
        body: the plan of one iteration (its own steps, tensors and transfers).
        body_time_s: the body plan's predicted time.
        stream_s: per iteration, the link time of the slices streamed between the stack's tier
            and the body's (the next iteration's slice moves during this one: double buffering);
            shown for explanation, the op's memory traffic pays for it.
        back_edge_s: per iteration, moving carried state whose body output lives in another tier
            than the next iteration reads it from (not overlapped).
        iteration_s: body_time_s + back_edge_s. The streams are not in it: the `while` op
            moves its operands (`operand_bytes`, `result_bytes`) as its memory traffic, so the
            enclosing plan charges max(loop time, those bytes / their tiers' bandwidth), the
            roofline's overlap of the double-buffered streams with the iterations. (Plans
            without `operand_bytes` count max(body_time_s, stream_s) + back_edge_s.)
        prologue_s: before the first iteration, loading what the body reads in another tier than
            the enclosing plan holds it in.
        epilogue_s: after the last, writing the carried results back where the enclosing plan
            keeps them.
        time_s: prologue_s + trips × iteration_s + epilogue_s.
        lower_bound_s: trips × the body's lower bound.
        reserved_bytes: tier → bytes the loop holds beyond the enclosing plan's tensors.
        double_buffer_bytes: tier → bytes of the second slice buffers (part of reserved_bytes).
        operand_bytes, result_bytes: loop operand index → bytes the `while` op reads of that
            operand and writes of that result, its own memory traffic: an xs or ys stack
            trips × its slices (0 for a stack nobody stores, a residual the backward loop
            recomputes); a carry, an invariant or the counter once (moved in before the first
            iteration, a carry's result out after the last). None in plans written before
            2026-12-07's second v2 revision, which priced those moves in `prologue_s`,
            `epilogue_s` and the iteration; 0 prologue and epilogue since.
        source_op_ids: body op id → the op's id inside the `while` of the enclosing program.
        notes: how the loop was planned (assumed trips, re-planned for capacity, ...).
    """

    op_id: str
    trips: int
    static_trips: bool
    roles: tuple[str, ...]
    operand_inputs: Mapping[int, str]
    operand_outputs: Mapping[int, str]
    body: Plan
    body_time_s: float
    stream_s: float
    back_edge_s: float
    iteration_s: float
    prologue_s: float
    epilogue_s: float
    time_s: float
    lower_bound_s: float
    reserved_bytes: Mapping[str, int]
    double_buffer_bytes: Mapping[str, int]
    source_op_ids: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    operand_bytes: Mapping[int, int] | None = None
    result_bytes: Mapping[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "op_id": self.op_id, "trips": self.trips, "static_trips": self.static_trips,
            "roles": list(self.roles),
            "operand_inputs": {str(k): v for k, v in sorted(self.operand_inputs.items())},
            "operand_outputs": {str(k): v for k, v in sorted(self.operand_outputs.items())},
            "body_time_s": self.body_time_s, "stream_s": self.stream_s,
            "back_edge_s": self.back_edge_s, "iteration_s": self.iteration_s,
            "prologue_s": self.prologue_s, "epilogue_s": self.epilogue_s,
            "time_s": self.time_s, "lower_bound_s": self.lower_bound_s,
            "reserved_bytes": dict(self.reserved_bytes),
            "double_buffer_bytes": dict(self.double_buffer_bytes),
            "source_op_ids": dict(self.source_op_ids), "notes": list(self.notes),
            **({} if self.operand_bytes is None else {
                "operand_bytes": {str(k): v for k, v in sorted(self.operand_bytes.items())},
                "result_bytes": {str(k): v for k, v in sorted((self.result_bytes or {}).items())},
            }),
            "body": self.body.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoopPlan:
        return cls(
            op_id=d["op_id"], trips=int(d["trips"]), static_trips=bool(d["static_trips"]),
            roles=tuple(d["roles"]),
            operand_inputs={int(k): v for k, v in d["operand_inputs"].items()},
            operand_outputs={int(k): v for k, v in d["operand_outputs"].items()},
            body=Plan.from_dict(d["body"]), body_time_s=float(d["body_time_s"]),
            stream_s=float(d["stream_s"]), back_edge_s=float(d["back_edge_s"]),
            iteration_s=float(d["iteration_s"]), prologue_s=float(d["prologue_s"]),
            epilogue_s=float(d["epilogue_s"]), time_s=float(d["time_s"]),
            lower_bound_s=float(d["lower_bound_s"]),
            reserved_bytes={k: int(v) for k, v in d["reserved_bytes"].items()},
            double_buffer_bytes={k: int(v) for k, v in d["double_buffer_bytes"].items()},
            source_op_ids=dict(d.get("source_op_ids", {})), notes=tuple(d.get("notes", [])),
            operand_bytes=({int(k): int(v) for k, v in d["operand_bytes"].items()}
                           if "operand_bytes" in d else None),
            result_bytes=({int(k): int(v) for k, v in d["result_bytes"].items()}
                          if "result_bytes" in d else None))


@dataclass(frozen=True)
class Plan:
    """A placement of a program on a target, as plain data. See the module docstring for semantics.

    What checks, reports or annotates a plan lives above the IR: `tiermap.Plan`
    (tiermap/plan_views.py) is this class with `verify`, `report`, `annotated_mlir` and the
    notebook view; `tiermap.plan` returns it.
    """

    program_name: str
    num_steps: int
    target: Target
    strategy: str
    ops: tuple[OpPlan, ...]
    tensors: tuple[TensorPlan, ...]
    transfers: tuple[Transfer, ...]
    predicted_time_s: float
    lower_bound_s: float
    traffic_bytes: Mapping[str, float]
    baselines: Mapping[str, float]
    solver: SolverInfo
    tiles: tuple[TileChoice, ...] = ()
    notes: tuple[str, ...] = ()
    attention: tuple[AttentionGroupPlan, ...] = ()
    loops: tuple[LoopPlan, ...] = ()
    warnings: tuple[str, ...] = ()
    # Tensors dropped and computed again (tiermap/ir/recompute.py; v2 key added 2026-12-07).
    recomputes: tuple[Recompute, ...] = ()
    # A partitioned program's communication (tiermap/ir/sharding.py); None for one device.
    sharding: ShardingPlan | None = None
    # What the applied program makes of each decision (tiermap/ir/decisions.py; v2 key added
    # 2026-12-08); empty until the applied program is traced (tiermap/as_run.py).
    decisions: tuple[Decision, ...] = ()
    program: Program | None = field(default=None, compare=False, repr=False)
    pass_wall_s: Mapping[str, float] = field(default_factory=dict, compare=False)

    # --- lookups ------------------------------------------------------------------------

    def tensor(self, tid: str) -> TensorPlan:
        for t in self.tensors:
            if t.id == tid:
                return t
        raise KeyError(tid)

    # --- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        tgt = self.target
        return {
            "schema": SCHEMA,
            "program": {"name": self.program_name, "num_steps": self.num_steps},
            "target": {
                "name": tgt.name,
                "description": tgt.description,
                "platform": tgt.platform,
                "units": tgt.units,
                "op_overhead_s": tgt.op_overhead_s,
                "vector_peak_fraction": tgt.vector_peak_fraction,
                "transcendental_flops": tgt.transcendental_flops,
                "parallel_grain_elements": tgt.parallel_grain_elements,
                "peak_flops_per_s": dict(tgt.peak_flops_per_s),
                "tiers": [_tier_dict(t) for t in tgt.tiers],
                "links": [{"src": lk.src, "dst": lk.dst, "bytes_per_s": lk.bytes_per_s}
                          for lk in tgt.links],
                **({"interconnect": {**tgt.interconnect.__dict__,
                                     "shape": list(tgt.interconnect.shape)}}
                   if tgt.interconnect else {}),
            },
            "strategy": self.strategy,
            "ops": [
                {"id": o.id, "kind": o.kind, "step": o.step, "flops": o.flops,
                 "inputs": list(o.inputs), "outputs": list(o.outputs),
                 "fusion_group": o.fusion_group, "predicted_time_s": o.predicted_time_s,
                 "compute_time_s": o.compute_time_s,
                 "bytes_by_tier": dict(o.bytes_by_tier)}
                for o in self.ops
            ],
            "tensors": [
                {"id": t.id, "shape": list(t.shape), "dtype": t.dtype, "nbytes": t.nbytes,
                 "producer_step": t.producer_step, "last_use_step": t.last_use_step,
                 "materialized": t.materialized,
                 "residency": [{"tier": r.tier, "from_step": r.from_step, "to_step": r.to_step}
                               for r in t.residency]}
                for t in self.tensors
            ],
            "transfers": [
                {"tensor": x.tensor, "src": x.src, "dst": x.dst, "start_step": x.start_step,
                 "end_step": x.end_step, "bytes": x.bytes}
                for x in self.transfers
            ],
            "tiles": [
                {"group": c.group, "kind": c.kind, "params": dict(c.params),
                 "traffic_bytes": c.traffic_bytes, "lower_bound_bytes": c.lower_bound_bytes,
                 "reference_bytes": c.reference_bytes, "reference": c.reference}
                for c in self.tiles
            ],
            "attention": [
                {"group": a.group, "backward_group": a.backward_group, "op_ids": list(a.op_ids),
                 "backward_op_ids": list(a.backward_op_ids),
                 "matmul_ordinals": list(a.matmul_ordinals), "q_len": a.q_len,
                 "kv_len": a.kv_len, "head_dim": a.head_dim, "output": a.output}
                for a in self.attention
            ],
            "predicted_time_s": self.predicted_time_s,
            "lower_bound_s": self.lower_bound_s,
            "traffic_bytes": dict(self.traffic_bytes),
            "baselines": dict(self.baselines),
            "solver": {
                "backend": self.solver.backend, "status": self.solver.status,
                "gap": self.solver.gap, "wall_s": self.solver.wall_s,
                "time_limit_s": self.solver.time_limit_s, "seed": self.solver.seed,
                "workers": self.solver.workers, "bound_s": self.solver.bound_s,
                "detail": self.solver.detail,
            },
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "recomputes": [r.to_dict() for r in self.recomputes],
            "decisions": [x.to_dict() for x in self.decisions],
            "loops": [loop.to_dict() for loop in self.loops],
            **({"sharding": self.sharding.to_dict()} if self.sharding else {}),
            "pass_wall_s": dict(self.pass_wall_s),
        }

    def to_json(self, indent: int | None = 1) -> str:
        """The plan as schema "tiermap.plan/v2" JSON; deterministic apart from "wall" keys."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan written by `to_json` (schema v2, or v1 from before loops); raises
        TiermapError on another schema."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TiermapError(f"plan JSON does not parse: {exc}") from None
        if not isinstance(d, dict) or d.get("schema") not in READ_SCHEMAS:
            found = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise TiermapError(f"plan JSON has schema {found!r}; expected one of "
                               f"{', '.join(repr(x) for x in READ_SCHEMAS)}")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """A plan from `to_dict`'s form (the schema key is not checked here)."""
        t = d["target"]
        target = Target(
            name=t["name"], description=t.get("description", ""),
            platform=t.get("platform", "cpu"),
            peak_flops_per_s=dict(t["peak_flops_per_s"]), units=int(t["units"]),
            tiers=tuple(
                Tier(name=x["name"], capacity_bytes=int(x["capacity_bytes"]),
                     read_bytes_per_s=float(x["read_bytes_per_s"]),
                     write_bytes_per_s=float(x["write_bytes_per_s"]),
                     per_unit=bool(x.get("per_unit", False)),
                     latency_s=float(x.get("latency_s", 0.0)),
                     energy_pj_per_byte=x.get("energy_pj_per_byte"),
                     read_only=bool(x.get("read_only", False)),
                     persistent=x.get("persistent"))
                for x in t["tiers"]),
            links=tuple(Link(lk["src"], lk["dst"], float(lk["bytes_per_s"]))
                        for lk in t.get("links", [])),
            op_overhead_s=float(t.get("op_overhead_s", 0.0)),
            vector_peak_fraction=float(t.get("vector_peak_fraction", 1.0)),
            transcendental_flops=float(t.get("transcendental_flops", 1.0)),
            parallel_grain_elements=float(t.get("parallel_grain_elements", 0.0)),
            interconnect=(Interconnect(**{**t["interconnect"],
                                          "shape": tuple(t["interconnect"]["shape"])})
                          if t.get("interconnect") else None),
        )
        s = d["solver"]
        return cls(
            program_name=d["program"]["name"], num_steps=int(d["program"]["num_steps"]),
            target=target, strategy=d["strategy"],
            ops=tuple(OpPlan(
                id=o["id"], kind=o["kind"], step=int(o["step"]), flops=float(o["flops"]),
                inputs=tuple(o["inputs"]), outputs=tuple(o["outputs"]),
                fusion_group=o.get("fusion_group"),
                predicted_time_s=float(o["predicted_time_s"]),
                bytes_by_tier=dict(o["bytes_by_tier"]),
                compute_time_s=float(o.get("compute_time_s", 0.0)),
            ) for o in d["ops"]),
            tensors=tuple(TensorPlan(
                id=x["id"], shape=tuple(x["shape"]), dtype=x["dtype"], nbytes=int(x["nbytes"]),
                producer_step=int(x["producer_step"]), last_use_step=int(x["last_use_step"]),
                materialized=bool(x["materialized"]),
                residency=tuple(Residency(r["tier"], int(r["from_step"]), int(r["to_step"]))
                                for r in x["residency"]),
            ) for x in d["tensors"]),
            transfers=tuple(Transfer(
                tensor=x["tensor"], src=x["src"], dst=x["dst"], start_step=int(x["start_step"]),
                end_step=int(x["end_step"]), bytes=int(x["bytes"])) for x in d["transfers"]),
            predicted_time_s=float(d["predicted_time_s"]),
            lower_bound_s=float(d["lower_bound_s"]),
            traffic_bytes=dict(d["traffic_bytes"]), baselines=dict(d["baselines"]),
            solver=SolverInfo(
                backend=s["backend"], status=s["status"], gap=s.get("gap"),
                wall_s=float(s.get("wall_s", 0.0)), time_limit_s=s.get("time_limit_s"),
                seed=s.get("seed"), workers=s.get("workers"), bound_s=s.get("bound_s"),
                detail=s.get("detail", "")),
            tiles=tuple(TileChoice(
                group=c["group"], kind=c["kind"], params=dict(c["params"]),
                traffic_bytes=float(c["traffic_bytes"]),
                lower_bound_bytes=float(c["lower_bound_bytes"]),
                reference_bytes=c.get("reference_bytes"), reference=c.get("reference", ""))
                for c in d.get("tiles", [])),
            notes=tuple(d.get("notes", [])),
            attention=tuple(AttentionGroupPlan(
                group=a["group"], backward_group=a.get("backward_group"),
                op_ids=tuple(a["op_ids"]), backward_op_ids=tuple(a.get("backward_op_ids", [])),
                matmul_ordinals=(int(a["matmul_ordinals"][0]), int(a["matmul_ordinals"][1])),
                q_len=int(a["q_len"]), kv_len=int(a["kv_len"]), head_dim=int(a["head_dim"]),
                output=str(a.get("output", "")))
                for a in d.get("attention", [])),  # absent in plans written before 2026-12
            loops=tuple(LoopPlan.from_dict(x) for x in d.get("loops", [])),  # v2
            warnings=tuple(d.get("warnings", [])),  # v2, added 2026-12-07; absent before
            recomputes=tuple(Recompute.from_dict(x) for x in d.get("recomputes", [])),  # ditto
            sharding=ShardingPlan.from_dict(d["sharding"]) if d.get("sharding") else None,
            decisions=tuple(Decision.from_dict(x) for x in d.get("decisions", [])),  # 2026-12-08
            pass_wall_s=dict(d.get("pass_wall_s", {})),
        )


def _tier_dict(t: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": t.name, "capacity_bytes": t.capacity_bytes, "per_unit": t.per_unit,
        "read_bytes_per_s": t.read_bytes_per_s, "write_bytes_per_s": t.write_bytes_per_s,
    }
    if t.latency_s:
        out["latency_s"] = t.latency_s
    if t.energy_pj_per_byte is not None:
        out["energy_pj_per_byte"] = t.energy_pj_per_byte
    if t.read_only:
        out["read_only"] = True
    if t.persistent is not None:
        out["persistent"] = t.persistent
    return out


# --- queries (the report, the plots and the trace read plans through these) ---


def tier_at_step(tensor: TensorPlan, step: int) -> str | None:
    """The first tier of `tensor.residency` holding it at `step` (None if none, e.g. fused)."""
    for res in tensor.residency:
        if res.from_step <= step <= res.to_step:
            return res.tier
    return None


def usable_tier(plan: Plan, tensor: TensorPlan, step: int,
                transfers: Sequence[Transfer] | None = None) -> str | None:
    """The fastest tier where `tensor` is usable at `step` (a copy counts once its transfer, or
    the last chunk of its move, ends).

    `transfers` may pass the tensor's own transfers when calling this in a loop.
    """
    if transfers is None:
        transfers = [x for x in plan.transfers if x.tensor == tensor.id]
    tiers = []
    for r in tensor.residency:
        if not r.from_step <= step <= r.to_step:
            continue
        into = [x for x in transfers if x.dst == r.tier and r.from_step <= x.start_step
                <= r.to_step]
        if not (into and min(x.start_step for x in into) <= step
                <= max(x.end_step for x in into)):
            tiers.append(r.tier)
    if not tiers:
        return tier_at_step(tensor, step)
    order = {t.name: i for i, t in enumerate(plan.target.tiers)}
    return min(tiers, key=lambda name: order.get(name, len(order)))


def occupancy_bytes(plan: Plan) -> dict[str, list[int]]:
    """Bytes resident in each tier at each step (every tier of the target, fastest first)."""
    delta: dict[str, list[int]] = {t.name: [0] * (plan.num_steps + 1) for t in plan.target.tiers}
    for tensor in plan.tensors:
        if not tensor.materialized:
            continue
        for res in tensor.residency:
            row = delta.setdefault(res.tier, [0] * (plan.num_steps + 1))
            first = max(res.from_step, 0)
            last = min(res.to_step, plan.num_steps - 1)
            if last < first:
                continue
            row[first] += tensor.nbytes
            row[last + 1] -= tensor.nbytes
    out: dict[str, list[int]] = {}
    for tier, row in delta.items():
        running, values = 0, []
        for s in range(plan.num_steps):
            running += row[s]
            values.append(running)
        out[tier] = values
    return out


def annotations_for(plan: Plan) -> dict[str, dict[str, Any]]:
    """Per-op `tiermap.*` attributes: fusion group, predicted time, tier of each operand/result."""
    by_id = {t.id: t for t in plan.tensors}

    def tier_at(tid: str, step: int) -> str:
        tp = by_id.get(tid)
        if tp is None or not tp.materialized:
            return "fused"
        for r in tp.residency:
            if r.from_step <= step <= r.to_step:
                return r.tier
        return "?"

    out: dict[str, dict[str, Any]] = {}
    for o in plan.ops:
        out[o.id] = {
            "predicted_time_s": o.predicted_time_s,
            "fusion_group": o.fusion_group or "",
            "operand_tiers": ",".join(tier_at(v, o.step) for v in o.inputs),
            "result_tiers": ",".join(tier_at(v, o.step) for v in o.outputs),
        }
    return out
