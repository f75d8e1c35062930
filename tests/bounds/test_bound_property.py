"""Property: no plan beats the program lower bound.

Random programs (built directly, and random jnp compositions lowered through the frontend) × random
two- or three-tier targets × random valid placements (a random tier per segment of each tensor's
live range, legal transfers between segments, capacities respected; random fusion groups) must all
have evaluate(...).predicted_time_s ≥ program_lower_bound_s(...).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tiermap.bounds.knapsack import program_lower_bound_s
from tiermap.costmodel.evaluate import Evaluation, evaluate
from tiermap.frontend.lowering import lower
from tiermap.hardware.target import Link, Target, Tier
from tiermap.ir.fusion import Fusion, FusionGroup
from tiermap.ir.plan import Residency, Transfer, alias_pairs
from tiermap.ir.program import Op, Program, TensorType, Value

KINDS = ("stablehlo.add", "stablehlo.exponential", "stablehlo.dot_general", "stablehlo.reduce",
         "stablehlo.slice", "stablehlo.dynamic_update_slice", "stablehlo.convert",
         "stablehlo.reshape")
DTYPES = ("f32", "bf16", "f16", "i32")


# --- random ingredients ---------------------------------------------------------------------------


def random_target(rng: random.Random) -> Target:
    """2–3 residency tiers (the last one huge), sometimes a scratchpad in front, random speeds."""
    n_tiers = rng.choice((2, 3))
    tiers = []
    if rng.random() < 0.3:
        tiers.append(Tier("scratch", rng.randint(1 << 10, 1 << 16), 1e13, 1e13, per_unit=True))
    for i in range(n_tiers):
        last = i == n_tiers - 1
        tiers.append(Tier(
            f"m{i}", 10**12 if last else rng.choice((2_000, 50_000, 1 << 20, 64 << 20)),
            10 ** rng.uniform(9, 13), 10 ** rng.uniform(9, 13),
            energy_pj_per_byte=rng.uniform(0.1, 50) if rng.random() < 0.5 else None))
    names = [t.name for t in tiers if t.holds_tensors]
    links = tuple(Link(a, b, 10 ** rng.uniform(8, 12)) for a in names for b in names
                  if a < b and rng.random() < 0.5)
    return Target(
        name="random", description="", platform=rng.choice(("cpu", "cuda", "tpu")),
        peak_flops_per_s={"f32": 10 ** rng.uniform(9, 14), "bf16": 10 ** rng.uniform(9, 15)},
        units=1, tiers=tuple(tiers), links=links,
        op_overhead_s=rng.choice((0.0, 1e-7, 2e-6)))


def random_program(rng: random.Random) -> Program:
    """A straight-line program over random-sized tensors; op costs in the frontend's style."""
    values: dict[str, Value] = {}
    n_inputs = rng.randint(1, 3)
    for i in range(n_inputs):
        values[f"t{i}"] = Value(f"t{i}", TensorType((rng.choice((1, 10, 500, 40_000, 300_000)),),
                                                    rng.choice(DTYPES)), -1)
    ops = []
    for step in range(rng.randint(1, 12)):
        kind = rng.choice(KINDS)
        live = list(values)
        n_in = 2 if kind in ("stablehlo.add", "stablehlo.dot_general",
                             "stablehlo.dynamic_update_slice") else 1
        ins = tuple(rng.choice(live) for _ in range(n_in))
        if kind == "stablehlo.reshape":  # an alias op: its operand's buffer, free (frontend)
            vid = f"t{len(values)}"
            values[vid] = Value(vid, values[ins[0]].type, step)
            ops.append(Op(f"op{step}", kind, step, ins, (vid,), bytes_read=0.0,
                          bytes_written=0.0, attrs={"compute_dtype": values[ins[0]].dtype}))
            continue
        outs = []
        for _ in range(2 if rng.random() < 0.1 else 1):
            vid = f"t{len(values)}"
            values[vid] = Value(vid, TensorType(
                (rng.choice((1, 10, 500, 40_000, 300_000)),), rng.choice(DTYPES)), step)
            outs.append(vid)
        read = sum(values[v].nbytes for v in ins)
        written = sum(values[v].nbytes for v in outs)
        if kind == "stablehlo.slice":
            read = min(read, written)
        elif kind == "stablehlo.dynamic_update_slice":
            read = values[ins[1]].nbytes
        flops = rng.choice((0.0, 1e3, 1e6, 1e9)) if kind != "stablehlo.exponential" else 0.0
        trans = rng.choice((1e3, 1e6)) if kind == "stablehlo.exponential" else 0.0
        ops.append(Op(f"op{step}", kind, step, ins, tuple(outs), flops=flops,
                      transcendentals=trans, bytes_read=read, bytes_written=written,
                      attrs={"compute_dtype": values[ins[0]].dtype}))
    produced = [v for v in values if values[v].producer_step >= 0]
    outputs = {produced[-1]} | {v for v in produced if rng.random() < 0.2}
    return Program("random", tuple(ops), values, tuple(values)[:n_inputs], tuple(sorted(outputs)))


def random_fusion(program: Program, rng: random.Random) -> Fusion | None:
    """Random runs of consecutive ops fused; a tensor used only inside its run is internal."""
    if rng.random() < 0.4:
        return None
    groups: list[FusionGroup] = []
    step = 0
    outputs = set(program.outputs)
    while step < program.num_steps:
        size = rng.choice((1, 1, 2, 3))
        run = program.ops[step: step + size]
        step += size
        if len(run) < 2:
            continue
        steps = {op.step for op in run}
        internal = frozenset(
            v for op in run for v in op.outputs
            if v not in outputs and program.consumers[v]
            and all(s in steps for s in program.consumers[v]))
        ext = {v for op in run for v in op.inputs} - {v for op in run for v in op.outputs}
        reads = {v: float(rng.choice((1, 2, 4))) for v in ext if rng.random() < 0.3}
        groups.append(FusionGroup(f"g{len(groups)}", "random", tuple(op.id for op in run),
                                  internal, reads))
    return Fusion(tuple(groups))


def random_placement(program: Program, target: Target, fusion: Fusion | None,
                     rng: random.Random) -> tuple[dict[str, list[Residency]], list[Transfer]]:
    """Each live range cut into segments in random tiers that can hold the tensor, joined by
    transfers (dst resident from the start, src until the end), an alias op's result starting
    where its operand resides; then capacities are enforced by moving offenders, with the
    tensors alias ops tie to them, wholly to the last (huge) tier."""
    tiers = list(target.residency_tiers)
    internal = fusion.unmaterialized() if fusion is not None else frozenset()
    residency: dict[str, list[Residency]] = {}
    transfers: dict[str, list[Transfer]] = {}
    operand_of: dict[str, tuple[str, int]] = {}
    tied: dict[str, set[str]] = {}
    for op in program.ops:
        for x, y in alias_pairs(op.kind, op.inputs, op.outputs):
            if x not in internal and y not in internal:
                operand_of[y] = (x, op.step)
                group = tied.get(x, {x}) | tied.get(y, {y})
                for v in group:
                    tied[v] = group
    for vid, value in program.values.items():
        if vid in internal:
            continue
        lo, hi = program.live_range(vid)
        fits = [t.name for t in tiers if t.capacity_bytes >= value.nbytes]
        cuts = sorted(rng.sample(range(lo + 1, hi + 1), k=min(hi - lo, rng.randint(0, 3))))
        starts = [lo, *cuts]
        ends = [c - 1 for c in cuts] + [hi]
        seg_tiers = [rng.choice(fits) for _ in starts]
        if vid in operand_of:
            x, at = operand_of[vid]
            seg_tiers[0] = rng.choice(sorted({r.tier for r in residency[x]
                                              if r.from_step <= at <= r.to_step}))
        res: list[Residency] = []
        moves: list[Transfer] = []
        seg_from, usable_from, tier = lo, lo, seg_tiers[0]
        for i, nxt in enumerate(seg_tiers[1:]):
            if nxt == tier or usable_from > ends[i]:
                continue  # same tier, or the current copy is still arriving: stay
            start = rng.randint(usable_from, ends[i])
            end = rng.randint(start, min(hi, ends[i] + 1))
            res.append(Residency(tier, seg_from, max(ends[i], end)))
            moves.append(Transfer(vid, tier, nxt, start, end, value.nbytes))
            seg_from, usable_from, tier = start, end + 1, nxt
        res.append(Residency(tier, seg_from, hi))
        residency[vid] = res
        transfers[vid] = moves
    last = tiers[-1].name
    cap = {t.name: t.capacity_bytes for t in tiers}
    while True:
        over = _first_over_capacity(program, residency, cap)
        if over is None:
            break
        for vid in tied.get(over, {over}):
            residency[vid] = [Residency(last, *program.live_range(vid))]
            transfers[vid] = []
    return residency, [x for moves in transfers.values() for x in moves]


def _first_over_capacity(program: Program, residency: dict[str, list[Residency]],
                         cap: dict[str, int]) -> str | None:
    for step in range(program.num_steps):
        used: dict[str, int] = {}
        for vid, res in residency.items():
            for r in res:
                if r.from_step <= step <= r.to_step:
                    used[r.tier] = used.get(r.tier, 0) + program.values[vid].nbytes
        for tier, nbytes in used.items():
            if nbytes > cap[tier]:
                return max((v for v, res in residency.items()
                            if any(r.tier == tier and r.from_step <= step <= r.to_step
                                   for r in res)),
                           key=lambda v: program.values[v].nbytes)
    return None


def _check(program: Program, target: Target, fusion: Fusion | None,
           residency: dict[str, list[Residency]], transfers: list[Transfer]) -> Evaluation:
    ev = evaluate(program, target, residency, transfers, fusion)
    bound = program_lower_bound_s(program, target, fusion)
    assert ev.unplaced == (), ev.unplaced
    assert ev.predicted_time_s >= bound, (ev.predicted_time_s, bound)
    assert ev.predicted_time_s >= sum(ev.op_time_s) * (1 - 1e-12)
    assert all(s >= o for s, o in zip(ev.step_time_s, ev.op_time_s, strict=True))
    assert math.isfinite(ev.predicted_time_s)
    return ev


# --- properties -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_no_random_plan_beats_the_bound(seed: int) -> None:
    rng = random.Random(seed)
    program = random_program(rng)
    target = random_target(rng)
    fusion = random_fusion(program, rng)
    for _ in range(3):
        residency, transfers = random_placement(program, target, fusion, rng)
        _check(program, target, fusion, residency, transfers)


UNARY: dict[str, Callable[[Any], Any]] = {
    "exp": jnp.exp, "tanh": jnp.tanh, "neg": lambda x: -x, "sum0": lambda x: jnp.sum(x, 0),
    "softmax": lambda x: jax.nn.softmax(x, axis=-1), "t": lambda x: x.T,
    "slice": lambda x: x[1:, 1:], "half": lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
}
BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": lambda x, y: x + jnp.broadcast_to(jnp.mean(y, axis=1, keepdims=True)[:1], x.shape),
    "mul": lambda x, y: x * jnp.mean(y),
    "matmul": lambda x, y: x @ jnp.ones((x.shape[-1], 16), x.dtype) + jnp.sum(y),
}


def _composite(steps: list[tuple[str, str]]) -> Callable[[Any, Any], Any]:
    def fn(x: Any, y: Any) -> Any:
        for kind, name in steps:
            if x.ndim < 2 or x.shape[0] < 2 or x.shape[1] < 2:
                x = jnp.ones((8, 8)) * jnp.sum(x)
            x = UNARY[name](x) if kind == "u" else BINARY[name](x, y)
        return x
    return fn


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.one_of(st.tuples(st.just("u"), st.sampled_from(sorted(UNARY))),
                                st.tuples(st.just("b"), st.sampled_from(sorted(BINARY)))),
                      min_size=1, max_size=6),
       rows=st.sampled_from([8, 64, 512]), seed=st.integers(0, 2**32 - 1))
def test_no_random_plan_of_a_lowered_jax_program_beats_the_bound(
        steps: list[tuple[str, str]], rows: int, seed: int) -> None:
    rng = random.Random(seed)
    sds = jax.ShapeDtypeStruct
    program = lower(_composite(steps), sds((rows, 32), jnp.float32), sds((rows, 32), jnp.float32))
    target = random_target(rng)
    fusion = random_fusion(program, rng)
    for _ in range(3):
        residency, transfers = random_placement(program, target, fusion, rng)
        _check(program, target, fusion, residency, transfers)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_no_random_plan_beats_the_capacity_lp_bound(seed: int) -> None:
    """The capacity LP (tiermap/bounds/capacity_lp.py) is a relaxation of every plan, too: random
    placements, which hold tensors across steps and move them between tiers at random, never
    beat it."""
    from tiermap.bounds.capacity_lp import capacity_lower_bound

    rng = random.Random(seed)
    program = random_program(rng)
    target = random_target(rng)
    fusion = random_fusion(program, rng)
    result = capacity_lower_bound(program, target, fusion, time_limit_s=30.0)
    if result.bound_s is None:
        assert result.status == "no binding tier", result
        return
    event("a tier binds")
    knapsack_s = program_lower_bound_s(program, target, fusion)
    if result.bound_s > knapsack_s * (1 + 1e-6):
        event("the capacity LP is tighter")
    for _ in range(3):
        residency, transfers = random_placement(program, target, fusion, rng)
        ev = evaluate(program, target, residency, transfers, fusion)
        assert ev.unplaced == (), ev.unplaced
        assert ev.predicted_time_s >= result.bound_s, (ev.predicted_time_s, result.bound_s)
