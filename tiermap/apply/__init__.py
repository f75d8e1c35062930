"""tiermap.apply: run a planned program through JAX, with tiled attention kernels and host-tier
inputs.

`apply_plan(fn, plan)` returns a function that computes what `fn` computes, with

- every attention it recognises replaced by a tiled kernel with the plan's block sizes: JAX's
  Pallas flash attention on GPU (`jax.experimental.pallas.ops.gpu.attention.mha`) and TPU
  (`jax.experimental.pallas.ops.tpu.flash_attention`) where those kernels accept the pattern
  (scale and causal mask only, equal head dims, lengths divisible by the blocks), and the blocked
  JAX kernel of `tiermap/kernels/blocked_attention.py` everywhere else (online softmax, a
  recomputing `custom_vjp` backward, masks and biases sliced per block);
- program inputs that the plan keeps in a host tier placed in host memory
  (`memory_kind="pinned_host"`) where the device has that memory, and moved to device memory
  inside the program;
- every move of a top-level tensor into a host tier and back (an activation evicted after the
  forward and prefetched before the backward) made a `jax.device_put` to host memory and back
  to device memory at the equations of the steps the plan chose (`offload.py`);
- everything else run as `jax.jit` runs it.

A sharded plan (`plan.sharding`: the program is XLA's per-device program) is applied as the
function as written, jitted: XLA's SPMD partitioner partitions it again, keeping the arguments'
and the outputs' shardings, and the numbers are jax.jit's. The plan's kernel and host-tier
choices are for one device's program and are not mapped back onto the global jaxpr (yet); the
notes say so.

Mechanism: `fn` is traced to a jaxpr; calls to `jit`-wrapped functions are inlined
(`jaxpr.py`); attention and the backward `jax.grad` wrote for it are matched (`match.py`,
`match_backward.py`, giving `attention_match.AttentionMatch`es); the jaxpr is re-interpreted
with the matches replaced by kernels with the plan's tiles (`rewrite.py`) and the host moves
placed (`offload.py`); host-tier inputs are placed by `memory.py`. `AppliedFunction.decisions`
records what of the plan was applied and what was not, with the reason
(`tiermap/ir/decisions.py`).

Differentiating the applied function uses the kernel's `custom_vjp` (a recomputing, tiled
backward). Where `fn` differentiates a scan over attention layers, the attention split across
jax.grad's two scans runs as the paired kernels (`scan_pairs.py`): the forward scan stacks the
kernel's residuals instead of the probabilities, the transposed scan runs its backward.
When `fn` itself differentiates (`jax.grad`, `jax.vjp` inside it), the backward JAX
wrote out is matched too and replaced, with the forward, by `jax.vjp` of the kernel. Left to XLA
(with a note in `.notes`): attention whose probabilities are scaled by data (dropout), a backward
that differentiates a bias, and anything else outside these patterns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from tiermap.apply.jaxpr import inline_calls
from tiermap.apply.memory import (
    NO_HOST_KIND_NOTE,
    host_input_positions,
    host_kind_available,
    host_note,
    to_device_memory,
    to_host_memory,
)
from tiermap.apply.offload import (
    OffloadRun,
    OffloadSchedule,
    host_moves,
    kept_input_positions,
    offload_schedule,
    tensor_map,
)
from tiermap.apply.recompute import recompute_run
from tiermap.apply.rewrite import Rewriter
from tiermap.errors import TiermapError
from tiermap.ir.decisions import Decision
from tiermap.ir.plan import Plan

KERNELS = ("auto", "blocked", "pallas-gpu", "pallas-tpu")
SHARDED_NOTE = ("sharded plan: the program runs as jax.jit partitions it (shardings kept); the "
                "plan's per-device tier and kernel choices are not applied")


class AppliedFunction:
    """`fn` as the plan runs it. Call it like `fn`; `.lower(*args).compile()` gives the jax
    Compiled of the program as applied; `.notes` says what was replaced and how; `.decisions`
    lists each plan decision, applied or not with the reason (both filled once traced)."""

    def __init__(self, fn: Callable[..., Any], plan: Plan | None, static_argnums: Sequence[int],
                 static_argnames: Sequence[str], kernel: str, interpret: bool,
                 planned_only: bool = False) -> None:
        if kernel not in KERNELS:
            raise TiermapError(f"apply_plan: kernel={kernel!r}; expected one of "
                               f"{', '.join(KERNELS)}")
        self.fn = fn
        self.plan = plan
        self.static_argnums = tuple(static_argnums)
        self.static_argnames = tuple(static_argnames)
        self.kernel = kernel
        self.interpret = interpret
        self.planned_only = planned_only
        self.notes: list[str] = []
        # Each plan decision, applied or not with the reason; filled once traced.
        self.decisions: list[Decision] = []
        self._sharded = plan is not None and plan.sharding is not None
        self._host_positions = (host_input_positions(plan)
                                if plan is not None and not self._sharded else [])
        self._leaf_cache: dict[Any, list[int]] = {}
        self._jitted = jax.jit(self._inner, static_argnums=self.static_argnums,
                               static_argnames=self.static_argnames)
        self.__name__ = getattr(fn, "__name__", "applied")
        self.__doc__ = getattr(fn, "__doc__", None)

    def _split(self, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[list[Any], Callable[[list[Any]], tuple[tuple[Any, ...], dict]]]:
        """Dynamic leaves of (args, kwargs) and a function rebuilding them."""
        static_pos = {i % max(len(args), 1) for i in self.static_argnums} if args else set()
        dyn_args = [a for i, a in enumerate(args) if i not in static_pos]
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        leaves, tree = jax.tree.flatten((dyn_args, dyn_kwargs))

        def rebuild(new_leaves: list[Any]) -> tuple[tuple[Any, ...], dict]:
            da, dk = jax.tree.unflatten(tree, new_leaves)
            it = iter(da)
            full = tuple(a if i in static_pos else next(it) for i, a in enumerate(args))
            return full, {**kwargs, **dk}

        return leaves, rebuild

    def _inner(self, *args: Any, **kwargs: Any) -> Any:
        if self._sharded:
            self.notes = [SHARDED_NOTE]
            plan = self.plan
            planned = plan is not None and bool(plan.attention or plan.recomputes
                                                or host_moves(plan) or self._host_positions)
            self.decisions = [Decision("offload", "all", False, SHARDED_NOTE)] if planned else []
            return self.fn(*args, **kwargs)
        leaves, rebuild = self._split(args, kwargs)
        leaves = to_device_memory(leaves, self._host_leaves(args, kwargs))
        out_tree: list[Any] = []

        def flat_fn(*xs: Any) -> list[Any]:
            a, k = rebuild(list(xs))
            out = self.fn(*a, **k)
            flat, tree = jax.tree.flatten(out)
            out_tree.append(tree)
            return flat

        closed = jax.make_jaxpr(flat_fn)(*leaves)
        inlined = inline_calls(closed)
        rewriter = Rewriter(self.plan, self.kernel, self.interpret, self.planned_only)
        tmap = None
        plan = self.plan
        if plan is not None and plan.sharding is None and (plan.recomputes or host_moves(plan)):
            tmap = tensor_map(plan, inlined.jaxpr, inlined.consts)
        schedule = offload_schedule(plan, inlined.jaxpr, inlined.consts, tmap)
        rewriter.recompute = recompute_run(plan, inlined.jaxpr, tmap)
        run = None
        if schedule.moves and host_kind_available():
            run = rewriter.offload = OffloadRun(schedule)
        outs = rewriter.run(inlined.jaxpr, inlined.consts, leaves)
        self.notes = rewriter.notes or ["no attention recognised; the program runs as jax.jit"]
        if self._host_positions:
            self.notes.append(host_note(self._host_positions))
        self.decisions = self._decisions(rewriter, schedule, run)
        moves = [d for d in self.decisions if d.kind == "offload"]
        if moves:
            self.notes.append(f"host offload: {sum(d.applied for d in moves)} of {len(moves)} "
                              "tensors' host moves placed with jax.device_put")
        return jax.tree.unflatten(out_tree[0], outs)

    def _decisions(self, rewriter: Rewriter, schedule: OffloadSchedule,
                   run: OffloadRun | None) -> list[Decision]:
        """The plan's decisions, each applied or not with the reason (tiermap/ir/decisions.py)."""
        plan = self.plan
        out = list(rewriter.decisions)
        if plan is None:
            return out
        for where, sub in [("", plan), *((f" of loop {lp.op_id}'s body", lp.body)
                                          for lp in plan.loops)]:
            for group in sub.attention:
                name = group.group + where
                if name not in rewriter.groups_seen:
                    why = "; ".join(rewriter.skipped) or "no pattern of its shape in the jaxpr"
                    out.append(Decision("attention", name, False,
                                        "left to XLA: the jaxpr matcher did not recognise this "
                                        f"attention (the matcher: {why})"))
        has_host = host_kind_available()
        for pos in self._host_positions:
            vid = plan.program.inputs[pos] if plan.program is not None else ""
            steps = sorted(x.start_step for x in plan.transfers
                           if x.tensor == vid and x.dst == plan.target.main_tier.name)
            when = (f" (the plan brings it to {plan.target.main_tier.name} from step "
                    f"{steps[0]}; moving it there at that step is not applied yet)"
                    if steps else "")
            out.append(Decision("host-input", f"input {pos}", has_host,
                                "placed in pinned_host before the call, moved to device memory "
                                "at the program's start" + when if has_host else
                                "not applied: " + NO_HOST_KIND_NOTE))
        if rewriter.recompute is not None:
            out += rewriter.recompute.decisions()
        if run is not None:
            out += run.decisions()
        else:
            why = "this backend has no pinned_host memory kind"
            out += schedule.decisions
            listed = {d.subject for d in schedule.decisions}
            out += [Decision("offload", tid, False,
                             "; ".join(m.describe() for m in moves) + f": not applied: {why}")
                    for tid, moves in schedule.moves.items() if tid not in listed]
        for lp in plan.loops:
            inner = host_moves(lp.body)
            if inner:
                out.append(Decision("loop", lp.op_id, False,
                                    f"{len(inner)} tensors' host moves in the body's plan: not "
                                    "applied (moves inside loop bodies are not mapped yet)"))
        return out

    def _place_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not self._host_positions:
            return args, kwargs
        if not host_kind_available():
            if NO_HOST_KIND_NOTE not in self.notes:
                self.notes.append(NO_HOST_KIND_NOTE)
            return args, kwargs
        leaves, rebuild = self._split(args, kwargs)
        return rebuild(to_host_memory(leaves, self._host_leaves(args, kwargs)))

    def _host_leaves(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int]:
        """The leaves of (args, kwargs) that are the plan's host-tier inputs. The plan numbers
        the program's inputs, which are the used leaves (jax.jit leaves unused ones out of the
        StableHLO), so the positions are translated through a trace of `fn` (once per shapes)."""
        plan = self.plan
        if not self._host_positions or plan is None or plan.program is None:
            return self._host_positions
        leaves, rebuild = self._split(args, kwargs)
        key = tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)
        found = self._leaf_cache.get(key)
        if found is None:
            specs = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]

            def flat_fn(*xs: Any) -> list[Any]:
                a, k = rebuild(list(xs))
                return jax.tree.leaves(self.fn(*a, **k))

            jaxpr = inline_calls(jax.make_jaxpr(flat_fn)(*specs)).jaxpr
            kept = kept_input_positions(jaxpr, len(plan.program.inputs))
            found = ([kept[p] for p in self._host_positions] if kept is not None
                     else self._host_positions)
            self._leaf_cache[key] = found
        return found

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._place_inputs(args, kwargs)
        return self._jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """The jax `Lowered` of the program as applied (`.compile()` gives the Compiled)."""
        args, kwargs = self._place_inputs(args, kwargs)
        return self._jitted.lower(*args, **kwargs)


def apply_plan(fn: Callable[..., Any], plan: Plan | None, *, static_argnums: Sequence[int] = (),
               static_argnames: Sequence[str] = (), kernel: str = "auto",
               interpret: bool = False, planned_only: bool = False) -> AppliedFunction:
    """A function that runs `fn` as `plan` says (module docstring).

    Args:
        fn: the JAX function the plan was made for.
        plan: its Plan (block sizes of attention groups, tiers of inputs); None runs with tiles
            of 128 and no host placement.
        static_argnums, static_argnames: as for `jax.jit`.
        kernel: "auto" (Pallas on GPU/TPU where it applies, else blocked JAX), "blocked",
            "pallas-gpu" or "pallas-tpu" (falling back to blocked where not applicable).
        interpret: run Pallas kernels in interpret mode (for testing without the hardware).
        planned_only: leave to XLA an attention that no attention group of the plan covers
            (what `tiermap.jit` runs, so that the program is the plan); False tiles it with
            tiles searched for the target (for plans read from JSON written before the plan
            recorded its attention groups).

    Returns:
        An `AppliedFunction`: callable like `fn` (jit-compiled), with `.lower(*args)` returning
        the jax Lowered stage and `.notes` listing what was applied.
    """
    return AppliedFunction(fn, plan, static_argnums, static_argnames, kernel, interpret,
                           planned_only)


def applied_decisions(fn: Callable[..., Any], plan: Plan, *args: Any,
                      static_argnums: Sequence[int] = (), static_argnames: Sequence[str] = (),
                      planned_only: bool = True, **kwargs: Any) -> list[Decision]:
    """Each of the plan's decisions, applied or not with the reason, for these arguments
    (arrays or `jax.ShapeDtypeStruct`s): the program is traced as applied, not run."""
    applied = apply_plan(fn, plan, static_argnums=static_argnums,
                         static_argnames=static_argnames, planned_only=planned_only)
    applied.lower(*args, **kwargs)
    return list(applied.decisions)


def lower_applied(fn: Callable[..., Any], plan: Plan | None, *args: Any,
                  static_argnums: Sequence[int] = (), static_argnames: Sequence[str] = (),
                  planned_only: bool = False, **kwargs: Any) -> Any:
    """The jax Compiled of `fn` as `plan` runs it, for these arguments."""
    applied = apply_plan(fn, plan, static_argnums=static_argnums,
                         static_argnames=static_argnames, planned_only=planned_only)
    return applied.lower(*args, **kwargs).compile()
