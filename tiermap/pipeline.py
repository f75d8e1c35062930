"""The driver: a JAX function (or a Program) and a target in, a verified Plan out.

`plan(...)` loads the target, lowers the function for the target's platform, runs the passes

    schedule -> liveness -> [fusion passes] -> [recompute] -> place-tiers -> verify

with the PassManager (state re-checked after every pass, per-pass wall time recorded in
`Plan.pass_wall_s`) and returns the plan with the program attached. The plan carries the predicted
times of the baselines ("naive" and "greedy" for a "mip" plan, "naive" for a "greedy" plan) and
the program's lower bound. For the same input the plan's JSON is byte-identical apart from the
keys that contain "wall" (and, when a solver stops at its time limit, from what it found).

`time_limit_s` is a deadline for planning: the passes run after lowering get
`PipelineState.deadline_s` = the time lowering ended + `time_limit_s`. The fusion MIP takes at
most a share of what is left, and the placement MIP what is left after that less a reserve for
building and verifying its plan (see `PlaceTiersPass.mip_time_limit_s`), so the plan comes back
about `time_limit_s` after lowering ends. Passes that do not search (schedule, liveness, tiling,
greedy placement, verification) are not cut short: a program too large for them to finish in
time still gets its plan, late, with the MIP skipped (solver status "greedy_fallback").

A sharded function is planned as the per-device program XLA's SPMD partitioner makes
(tiermap/frontend/partitioned.py) on a target with as many devices; the plan's `sharding` holds
its collectives priced on the target's interconnect and the step time with communication.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from tiermap.bounds.knapsack import program_lower_bound_s
from tiermap.costmodel.communication import check_devices, communication_plan
from tiermap.errors import ChoiceError, InfeasiblePlacementError
from tiermap.frontend.lowering import lower
from tiermap.fusion.fuse import DEADLINE_SHARE, FusePass
from tiermap.fusion.tiling import TilePass
from tiermap.hardware.loader import load_target
from tiermap.hardware.target import Target
from tiermap.ir.fusion import Fusion
from tiermap.ir.program import Program
from tiermap.ir.untaken import Untaken
from tiermap.loop_planning import MAX_ROUNDS, loop_bodies, plan_with_loops
from tiermap.options import (
    DEFAULT_TIME_LIMIT_S,
    check_plan_options,
    check_positive_int,
    check_recompute_mode,
)
from tiermap.passes.base import Pass, PipelineState
from tiermap.passes.liveness import LivenessPass
from tiermap.passes.manager import PassManager
from tiermap.passes.schedule import SchedulePass
from tiermap.passes.verify import VerifyPass, verify_plan
from tiermap.placement.mip_model import SINGLE_WINDOW_NODE_LIMIT
from tiermap.placement.place_tiers import PlaceTiersPass
from tiermap.plan_views import Plan
from tiermap.recompute.recompute_pass import RecomputePass
from tiermap.recompute.select import OFFLOAD_WEIGHED

# The share of the planning time that the rounds of a program with loops get (pipeline.plan).
OUTER_SHARE = 0.75
# Branch-and-bound nodes of each planning round of a program with loops (planned up to
# MAX_ROUNDS times): 0, no MIP. The enclosing program is placed by greedy with its transfers
# re-spread; the bodies, whose time counts trips times, get the MIP. Measured 2026-12-08 on the
# scanned GPT training step against 1 node (the root with presolve, cuts and heuristics), one
# run each on this 2-core VM: 96 layers on sn40l 1.49 s instead of 4.7 s, 0.014% worse; 12
# layers on sn40l and h100 the same plans; on the starved a100 1.4 s instead of 4.7 s, 0.57%
# worse; benchmarks/loops.py's flax nn.scan step on sn40l 1.3% worse, the same on h100.
# (1 node had measured the same plans as 1000 within 0.3%, in half the time.)
LOOP_ROUND_NODE_LIMIT = 0


def fusion_passes(time_limit_s: float = 10.0, seed: int = 0, workers: int | None = None
                  ) -> list[Pass]:
    """The fusion and tiling passes, in order: `fuse` (MIP over fusion groups) and `tile`.

    `time_limit_s` is the whole planning time: the fusion MIP gets `DEADLINE_SHARE` of it, at
    most 10 s (placement needs the rest)."""
    return [FusePass(time_limit_s=min(DEADLINE_SHARE * time_limit_s, 10.0), seed=seed,
                     workers=workers or 1),
            TilePass()]


def build_passes(strategy: str = "mip", time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0,
                 backend: str = "highs", workers: int | None = None,
                 fusion: bool = True, capacity_bound: bool = False,
                 single_window_node_limit: int = SINGLE_WINDOW_NODE_LIMIT,
                 recompute: str = "auto") -> list[Pass]:
    """The pass list of `plan`: schedule, liveness, fusion (unless off or naive), recompute
    (unless off or naive), placement, verification."""
    passes: list[Pass] = [SchedulePass(), LivenessPass()]
    if fusion and strategy != "naive":
        passes.extend(fusion_passes(time_limit_s, seed, workers))
    if recompute != "off" and strategy != "naive":
        refuse: list[Pass] = [SchedulePass(), LivenessPass()]
        if fusion:
            refuse.extend(fusion_passes(time_limit_s, seed, workers))
        passes.append(RecomputePass(mode=recompute, seed=seed, refuse=tuple(refuse)))
    passes.append(PlaceTiersPass(strategy=strategy, time_limit_s=time_limit_s, seed=seed,
                                 backend=backend, workers=workers,
                                 capacity_bound=capacity_bound,
                                 single_window_node_limit=single_window_node_limit))
    passes.append(VerifyPass())
    return passes


def _load_target(target: str | Target) -> Target:
    if isinstance(target, Target):
        return target
    return load_target(target)


def plan(fn_or_program: Callable[..., Any] | Program, *args: Any, target: str | Target = "cpu",
         strategy: str = "mip", time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0,
         objective: str = "time", backend: str = "highs", workers: int | None = None,
         fusion: bool = True, passes: Sequence[Pass] | None = None,
         capacity_bound: bool = False, assumed_trip_count: int = 1,
         pair_loop_attention: bool = True, recompute: str = "auto",
         untaken: Untaken | None = None, **kwargs: Any) -> Plan:
    """Plan where every tensor of a JAX function (or Program) lives on `target`.

    Args:
        fn_or_program: a JAX function (traced on `args`) or a tiermap Program.
        *args: example arguments: arrays or `jax.ShapeDtypeStruct` pytrees.
        target: a built-in target name, a .toml path or a Target.
        strategy: "mip" (OR-tools, warm-started from greedy), "greedy" or "naive".
        time_limit_s: the planning deadline in seconds after lowering (module docstring): the
            fusion and placement MIPs fit their time limits into it.
        seed: the solver's random seed.
        objective: "time" (predicted seconds) or "energy" (needs energy figures on the tiers).
        backend: the MIP solver: "highs", "scip" or "cpsat".
        workers: solver threads (None: the machine's cores, at most 8).
        fusion: run the fusion passes (the "naive" strategy never fuses).
        passes: a custom pass list (default: `build_passes(...)`).
        capacity_bound: also solve the capacity LP for the plan's lower bound
            (tiermap/bounds/capacity_lp.py): tighter where a tier binds; 15-50 s on 4k-op programs,
            taken out of the time limit.
        assumed_trip_count: the trip count a `while` whose bound is not static (a loop until a
            data-dependent condition) is planned for; the plan's notes say it was assumed.
        pair_loop_attention: plan an attention whose forward runs in one loop and backward in
            jax.grad's transposed loop as one, the scores recomputed (tiermap/loop_pairing.py);
            False keeps the score residuals stored, as a program that does not run the pair's
            kernels does.
        recompute: "auto" (drop stored tensors where device memory is short and compute them
            again where that beats moving them to a host tier, by the selection's estimate of
            offload; the recompute-only plan and the plan without recomputation are made too
            and the one that predicts least is kept; tiermap/recompute/), "fit" (recompute what
            device memory needs, offload not weighed) or "off".
        untaken: decisions not to make because the program as applied does not realise them
            (tiermap/ir/untaken.py; `tiermap.as_run.plan_as_run` finds them); None: none.
        **kwargs: keyword arguments of the function.

    Raises:
        ChoiceError: an option is not one of its choices (the message lists them).
        HardwareSpecError: the target is unknown or its file is wrong.
        InfeasiblePlacementError: the program does not fit the target.
        PassError: a pass failed (names the pass).
    """
    check_plan_options(strategy, objective, backend, time_limit_s, seed, workers)
    check_positive_int("assumed_trip_count", assumed_trip_count)
    check_recompute_mode(recompute)
    tgt = _load_target(target)
    if isinstance(fn_or_program, Program):
        if args or kwargs:
            raise ChoiceError("a Program takes no example arguments; pass a function to trace "
                              "instead, or drop the arguments")
        program = fn_or_program
    elif callable(fn_or_program):
        program = lower(fn_or_program, *args, platform=tgt.platform, **kwargs)
    else:
        raise ChoiceError(f"plan() takes a function or a tiermap Program, not "
                          f"{type(fn_or_program).__name__}")
    check_devices(program, tgt)
    pass_list = list(passes) if passes is not None else None
    top_bodies = loop_bodies(program, assumed_trip_count)
    # With loops, each planning round of the enclosing program (at most MAX_ROUNDS) gets an
    # equal part of OUTER_SHARE of the time, and each body (with the loops inside it) an equal
    # part of the rest: bodies are small programs, the enclosing one is a single MIP window.
    outer_s = OUTER_SHARE * time_limit_s / MAX_ROUNDS if top_bodies else time_limit_s
    body_s = (1.0 - OUTER_SHARE) * time_limit_s / max(len(top_bodies), 1)

    def plan_flat(prog: Program, planned_on: Target, tgt_: Target) -> Plan:
        outer = prog.name == program.name and bool(top_bodies)
        share_s = body_s if top_bodies and not outer else outer_s
        chosen = pass_list if pass_list is not None else build_passes(
            strategy, share_s, seed, backend, workers, fusion, capacity_bound,
            LOOP_ROUND_NODE_LIMIT if outer else SINGLE_WINDOW_NODE_LIMIT,
            recompute if prog is program else "off")
        planned = _run_passes(prog, planned_on, chosen, objective, share_s, tgt_, untaken)
        if pass_list is not None or prog is not program or recompute != "auto":
            return planned
        # "auto" weighs recomputation by estimates; the plans it is weighed against are made
        # too and the one that predicts least is kept (the notes say which, with each time):
        # the recompute-only selection where the selection weighed offload by an estimate,
        # and the plan without recomputation where the program fits without it.
        tried = [("mixed" if any(OFFLOAD_WEIGHED in n for n in planned.notes)
                  else "recomputing", planned)]
        others = []
        if any(OFFLOAD_WEIGHED in n for n in planned.notes):
            others.append(("recompute-only", "fit"))
        if planned.recomputes:  # (without any, the plan is the one without recomputation)
            others.append(("not recomputing", "off"))
        for name, mode in others:
            try:
                tried.append((name, _run_passes(prog, planned_on, build_passes(
                    strategy, share_s, seed, backend, workers, fusion, capacity_bound,
                    SINGLE_WINDOW_NODE_LIMIT, mode), objective, share_s, tgt_, untaken)))
            except InfeasiblePlacementError:
                continue  # the program does not fit without recomputing
        if len(tried) == 1:
            return planned
        best_name, best = min(tried, key=lambda x: x[1].predicted_time_s)  # first of ties
        others_text = ", ".join(f"the {n} one ({p.predicted_time_s:.6g} s)"
                                for n, p in tried if p is not best)
        return Plan.of(replace(best, notes=best.notes + (
            f"recompute: the {best_name} plan ({best.predicted_time_s:.6g} s) kept over "
            f"{others_text}",)))

    def plan_any(prog: Program, tgt_: Target) -> Plan:
        planned = plan_with_loops(prog, tgt_, plan_flat, plan_any, assumed_trip_count,
                                  top_bodies if prog is program else None,
                                  pair_loop_attention)
        if planned.loops:  # the passes verified the plan and each body; now with its loops
            verify_plan(planned, prog, bodies=False)
        return Plan.of(planned)

    planned = plan_any(program, tgt)
    if program.num_devices > 1:
        # One device's plan; the devices talk over the interconnect (tiermap/ir/sharding.py).
        op_time_s = [o.predicted_time_s for o in planned.ops]
        planned = Plan.of(replace(planned, sharding=communication_plan(program, op_time_s, tgt)))
    return planned


def _run_passes(program: Program, tgt: Target, pass_list: Sequence[Pass], objective: str,
                time_limit_s: float, real: Target | None = None,
                untaken: Untaken | None = None) -> Plan:
    """One program (its loops already priced) through the passes, on `tgt`.

    `real`: the target the plan is for when `tgt` is it with less capacity (room left for the
    loops): the plan then names `real`, and its lower bound is the smaller of the two bounds
    (less capacity can only raise a bound)."""
    deadline_s = time.perf_counter() + time_limit_s
    state = PassManager(list(pass_list)).run(PipelineState(
        program, tgt, Fusion(), objective, deadline_s=deadline_s,
        untaken=untaken if untaken is not None else Untaken()))
    planned = state.plan
    if planned is None:
        raise ChoiceError("the pass list has no placement pass ('place-tiers'); add one")
    if real is not None and real is not tgt:
        bound = program_lower_bound_s(state.program, real, state.fusion)
        planned = replace(planned, target=real, lower_bound_s=min(planned.lower_bound_s, bound))
    if state.fusion.notes or state.fusion.warnings:
        # What fusion and tiling decided (and left unfused, and why) belongs in the plan too.
        return Plan.of(replace(planned, notes=tuple(state.fusion.notes) + tuple(planned.notes),
                               warnings=tuple(state.fusion.warnings) + tuple(planned.warnings)))
    return Plan.of(planned)
