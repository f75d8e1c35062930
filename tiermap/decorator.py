"""`tiermap.jit`: `jax.jit` that plans the program for a memory hierarchy and runs the plan.

    @tiermap.jit(target="sn40l")
    def step(params, batch): ...

    step(params, batch)                     # plans once per input shapes, then runs the plan
    step.lower(params, batch).plan()        # the Plan (a tiermap.Plan)
    step.lower(params, batch).compile()     # jax's Compiled of the program as applied
    step.lower(params, batch).decisions()   # what of the plan the applied program realises

A call looks up its cache key (the pytree structure, shapes, dtypes and weak types of the dynamic
arguments, and the values of the static ones). On a miss it plans the program on
`jax.ShapeDtypeStruct`s of the arguments with `tiermap.pipeline.plan`, turns the plan into
a runnable function with `tiermap.apply.apply_plan` and traces it; where the applied program
does not realise a decision of the plan, it plans again without it (tiermap/as_run.py), so the
plan it keeps (with `Plan.decisions`) predicts the program that runs. It keeps both. Calls
inside an outer JAX transformation (`jax.grad`, `jax.vmap`, an enclosing `jax.jit`) plan on the
abstract values seen there and run the applied function under the outer trace, so the
transformations compose.

Arguments sharded over several devices keep their shardings in the cache key and in the planned
structs: the plan is then the per-device plan of the partitioned program (`Plan.sharding`), and
the applied function is the function as jax.jit partitions it (tiermap/apply/__init__.py).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from tiermap import pipeline
from tiermap.as_run import plan_as_run
from tiermap.errors import TiermapError
from tiermap.hardware.loader import load_target
from tiermap.ir.decisions import Decision
from tiermap.ir.untaken import Untaken
from tiermap.options import (
    DEFAULT_TIME_LIMIT_S,
    check_plan_options,
    check_positive_int,
    check_recompute_mode,
)

if TYPE_CHECKING:
    import jax

    from tiermap.hardware.target import Target
    from tiermap.plan_views import Plan



class CacheInfo(NamedTuple):
    """Plan-cache statistics, as `functools.lru_cache` reports them."""

    hits: int
    misses: int
    currsize: int


@dataclass(frozen=True)
class _Entry:
    """What one cache key resolves to: the plan and the functions that run it."""

    plan: Plan
    applied: Callable[..., Any]       # apply_plan's function: takes (dynamic args, dyn. kwargs)
    run_dynamic: Callable[..., Any]   # jax.jit(applied)
    run_user: Callable[..., Any]      # the user's signature (static args ignored, baked in)


def _spec(leaf: Any) -> Any:
    """A `jax.ShapeDtypeStruct` for an array-like leaf (arrays, tracers, scalars, structs); a
    concrete array or struct sharded over several devices keeps its sharding."""
    import jax

    try:
        aval = jax.typeof(leaf)
    except TypeError as exc:
        raise TypeError(
            f"tiermap.jit: argument leaf of type {type(leaf).__name__} is not an array; pass "
            "arrays (or mark the argument static with static_argnums/static_argnames)"
        ) from exc
    sharding = None
    if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct) and not isinstance(leaf, jax.core.Tracer):
        found = getattr(leaf, "sharding", None)
        if found is not None and len(getattr(found, "device_set", ())) > 1:
            sharding = found
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type,
                                sharding=sharding)


def _hashable(value: Any, where: str) -> Hashable:
    try:
        hash(value)
    except TypeError:
        raise ValueError(
            f"tiermap.jit: static argument {where} of type {type(value).__name__} is not "
            "hashable; static arguments must be hashable (use a tuple instead of a list)"
        ) from None
    return value


class Lowered:
    """The staged program for one set of arguments: `.plan()` and `.compile()`."""

    def __init__(self, owner: TiermapJitted, entry: _Entry, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self._owner = owner
        self._entry = entry
        self._args = args
        self._kwargs = kwargs

    def plan(self) -> Plan:
        """The Plan for these argument shapes."""
        return self._entry.plan

    def compile(self) -> jax.stages.Compiled:
        """jax's `Compiled` of the program as applied (call it with the dynamic arguments only,
        as a `jax.jit(...).lower(...).compile()` result)."""
        return self.lowered().compile()

    def lowered(self) -> jax.stages.Lowered:
        """jax's `Lowered` of the program as applied."""
        import jax

        jitted = jax.jit(self._entry.run_user, static_argnums=self._owner.static_argnums,
                         static_argnames=self._owner.static_argnames)
        return jitted.lower(*self._args, **self._kwargs)

    def memory_check(self) -> Any:
        """The plan's peak device bytes against XLA's memory analysis of the program as applied
        (`tiermap.apply.compiled_memory.MemoryCheck`; compiles it)."""
        # local import: tiermap.apply imports jax at module level; `import tiermap` stays cheap
        from tiermap.apply.compiled_memory import memory_check

        return memory_check(self._entry.plan, self.compile())

    @property
    def notes(self) -> tuple[str, ...]:
        """What applying the plan changed (kernels chosen for attention, host placement), as
        `tiermap.apply` reports it; filled once the program has been traced."""
        return tuple(getattr(self._entry.applied, "notes", ()))

    def decisions(self) -> tuple[Decision, ...]:
        """Each plan decision and what the program as applied does about it: attention groups
        tiled or left to XLA, host-tier inputs, moves of tensors to host memory and back, each
        applied or not with the reason (tiermap/ir/decisions.py). Traces the applied program
        if it has not been traced yet."""
        if self._entry.plan.decisions:
            return self._entry.plan.decisions
        if not getattr(self._entry.applied, "decisions", None):
            self.lowered()
        return tuple(getattr(self._entry.applied, "decisions", ()))

    def as_text(self) -> str:
        """The planned program's StableHLO with `tiermap.*` attributes on every op."""
        return self._entry.plan.annotated_mlir()

    def __repr__(self) -> str:
        p = self._entry.plan
        return (f"<tiermap Lowered {p.program_name} on {p.target.name}: "
                f"{p.strategy}, predicted {p.predicted_time_s:.3g} s>")


class TiermapJitted:
    """A function planned for a target; see `jit`."""

    def __init__(self, fn: Callable[..., Any], *, target: str | Target = "cpu",
                 strategy: str = "mip", time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0,
                 objective: str = "time", static_argnums: int | Sequence[int] = (),
                 static_argnames: str | Sequence[str] = (), assumed_trip_count: int = 1,
                 recompute: str = "auto") -> None:
        if not callable(fn):
            raise TypeError(f"tiermap.jit: expected a function, got {type(fn).__name__}")
        check_plan_options(strategy=strategy, objective=objective, time_limit_s=time_limit_s,
                           seed=seed)
        check_positive_int("assumed_trip_count", assumed_trip_count)
        check_recompute_mode(recompute)
        self.assumed_trip_count = assumed_trip_count
        self.recompute = recompute
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.target: Target = load_target(target)
        self.strategy = strategy
        self.time_limit_s = float(time_limit_s)
        self.seed = int(seed)
        self.objective = objective
        nums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        self.static_argnums, self.static_argnames = _infer_static(fn, nums, names)
        self._cache: dict[Hashable, _Entry] = {}
        self._lock = threading.RLock()
        self._hits = 0
        self._misses = 0

    # --- calling ---------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        entry, dyn_args, dyn_kwargs = self._entry_for(args, kwargs)
        return entry.run_dynamic(dyn_args, dyn_kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Lowered:
        """Plan for these arguments (arrays or `jax.ShapeDtypeStruct`s) without running."""
        entry, _, _ = self._entry_for(args, kwargs)
        return Lowered(self, entry, args, kwargs)

    def plan(self, *args: Any, **kwargs: Any) -> Plan:
        """Shorthand for `self.lower(*args, **kwargs).plan()`."""
        return self.lower(*args, **kwargs).plan()

    def cache_info(self) -> CacheInfo:
        """How many calls found a plan (hits), made one (misses), and how many are kept."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache))

    def clear_cache(self) -> None:
        """Forget every plan (the next call plans again)."""
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return (f"<tiermap.jit {name} target={self.target.name!r} strategy={self.strategy!r}>")

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return functools.partial(self, obj)

    # --- internals ---------------------------------------------------------------------------

    def _split(self, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[tuple[Any, ...], dict[str, Any], dict[int, Any], dict[str, Any]]:
        n = len(args)
        static_pos: dict[int, Any] = {}
        for i in self.static_argnums:
            j = i + n if i < 0 else i
            if 0 <= j < n:
                static_pos[j] = _hashable(args[j], f"at position {i}")
        dyn_args = tuple(a for j, a in enumerate(args) if j not in static_pos)
        static_kw = {k: _hashable(v, repr(k)) for k, v in kwargs.items()
                     if k in self.static_argnames}
        dyn_kw = {k: v for k, v in kwargs.items() if k not in static_kw}
        return dyn_args, dyn_kw, static_pos, static_kw

    def _entry_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[_Entry, tuple[Any, ...], dict[str, Any]]:
        import jax

        dyn_args, dyn_kw, static_pos, static_kw = self._split(args, kwargs)
        leaves, treedef = jax.tree.flatten((dyn_args, dyn_kw))
        specs = [_spec(leaf) for leaf in leaves]
        key = (treedef, tuple((s.shape, str(s.dtype), s.weak_type, s.sharding) for s in specs),
               len(args),
               tuple(sorted(static_pos.items())), tuple(sorted(static_kw.items())))
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._hits += 1
                return entry, dyn_args, dyn_kw
            self._misses += 1
        spec_args, spec_kw = jax.tree.unflatten(treedef, specs)
        entry = self._build(len(args), static_pos, static_kw, spec_args, spec_kw)
        with self._lock:
            self._cache.setdefault(key, entry)
        return entry, dyn_args, dyn_kw

    def _build(self, num_args: int, static_pos: dict[int, Any], static_kw: dict[str, Any],
               spec_args: tuple[Any, ...], spec_kw: dict[str, Any]) -> _Entry:
        import jax

        fn = self.fn

        def merged(dyn_args: tuple[Any, ...], dyn_kw: dict[str, Any]) -> Any:
            it = iter(dyn_args)
            full = [static_pos[j] if j in static_pos else next(it) for j in range(num_args)]
            return fn(*full, **dyn_kw, **static_kw)

        merged.__name__ = getattr(fn, "__name__", "fn")
        merged.__qualname__ = getattr(fn, "__qualname__", merged.__name__)

        def planned(pair: bool, untaken: Untaken | None = None) -> Plan:
            return pipeline.plan(merged, spec_args, spec_kw, target=self.target,
                                 strategy=self.strategy, time_limit_s=self.time_limit_s,
                                 seed=self.seed, objective=self.objective,
                                 assumed_trip_count=self.assumed_trip_count,
                                 pair_loop_attention=pair, recompute=self.recompute,
                                 untaken=untaken)

        applied_of: dict[int, Callable[..., Any]] = {}

        def decide(p: Plan) -> list[Decision]:
            """Trace `p` as applied (not run): its decisions, applied or not."""
            fn_applied = _apply(merged, p)
            jax.eval_shape(fn_applied, spec_args, spec_kw)
            applied_of[id(p)] = fn_applied
            return list(getattr(fn_applied, "decisions", ()))

        pair = True
        first = planned(pair)
        decisions = decide(first)
        wanted = sum(PAIRED_PLAN_NOTE in n for n in first.notes)
        ran = sum(PAIRED_APPLY_NOTE in n for n in getattr(applied_of[id(first)], "notes", ()))
        if wanted and ran < wanted:
            # The plan pairs attention split across jax.grad's two scans and the applied
            # program does not run every pair: plan again without pairing.
            pair = False
            first = planned(pair)
            decisions = decide(first)
        as_run = plan_as_run(first, decisions, lambda u: planned(pair, u), decide)
        plan = as_run.plan
        applied = applied_of[id(as_run.source)]
        run_dynamic = jax.jit(applied)
        static_nums = {j for j in range(num_args)
                       for i in self.static_argnums if j == (i + num_args if i < 0 else i)}

        def run_user(*args: Any, **kwargs: Any) -> Any:
            dyn_args = tuple(a for j, a in enumerate(args) if j not in static_nums)
            dyn_kw = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
            return applied(dyn_args, dyn_kw)

        functools.update_wrapper(run_user, fn)
        return _Entry(plan=plan, applied=applied, run_dynamic=run_dynamic, run_user=run_user)


# How the plan (tiermap/loop_pairing.py) and the applied program (tiermap/apply/rewrite.py) say
# that an attention split across jax.grad's two scans is paired.
PAIRED_PLAN_NOTE = "attention forward in"
PAIRED_APPLY_NOTE = "split across jax.grad's two scans"


def _apply(fn: Callable[..., Any], plan: Plan) -> Callable[..., Any]:
    """The planned program as a JAX function: tiled attention kernels with the plan's block
    sizes, host-tier inputs in host memory (see `tiermap.apply` and `tiermap.apply.memory`)."""
    # local import: tiermap.apply imports jax at module level; `import tiermap` stays cheap
    from tiermap.apply import apply_plan

    return apply_plan(fn, plan, planned_only=True)


def _infer_static(fn: Callable[..., Any], nums: tuple[int, ...], names: tuple[str, ...]
                  ) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Like jax.jit: static positions imply their parameter names and the other way round."""
    for i in nums:
        if not isinstance(i, int):
            raise TypeError(f"tiermap.jit: static_argnums must be ints, got {i!r}")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return nums, names
    positional = [p for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    known = {p.name for p in params}
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    for name in names:
        if name not in known and not has_var_kw:
            raise ValueError(f"tiermap.jit: static_argnames names {name!r}, which is not a "
                             f"parameter of {getattr(fn, '__name__', 'the function')} "
                             f"(parameters: {', '.join(p.name for p in params)})")
    out_nums = list(nums)
    out_names = list(names)
    for i, p in enumerate(positional):
        if p.name in names and i not in out_nums:
            out_nums.append(i)
        if (i in nums or i - len(positional) in nums) and p.kind is not p.POSITIONAL_ONLY \
                and p.name not in out_names:
            out_names.append(p.name)
    return tuple(out_nums), tuple(out_names)


def jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Plan `fn` for a memory hierarchy and run the planned program, like `jax.jit`.

    Use as `@tiermap.jit`, `@tiermap.jit(target="h100")` or `tiermap.jit(fn, target="h100")`.

    Args:
        fn: The function (arrays or pytrees of arrays in, pytree out).
        **options: `target` (built-in name, .toml path or Target; default "cpu"), `strategy`
            ("mip" | "greedy" | "naive"), `time_limit_s`, `seed`, `objective` ("time" |
            "energy"), `static_argnums`, `static_argnames` (as in `jax.jit`),
            `assumed_trip_count` (trips of a loop whose bound is not static; default 1),
            `recompute` ("auto" | "fit" | "off": recompute stored tensors where device memory
            is short, see `tiermap.plan`).

    Returns:
        A `TiermapJitted` (or, without `fn`, a decorator that makes one). It plans once per
        argument shapes/dtypes/static values; `.lower(*args).plan()` gives the Plan,
        `.lower(*args).compile()` jax's Compiled of the applied program, `.cache_info()` the
        plan-cache statistics.
    """
    allowed = {"target", "strategy", "time_limit_s", "seed", "objective", "static_argnums",
               "static_argnames", "assumed_trip_count", "recompute"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"tiermap.jit: unknown option(s) {', '.join(unknown)}; options are "
                        f"{', '.join(sorted(allowed))}")
    if fn is None:
        return lambda f: TiermapJitted(f, **options)
    if isinstance(fn, str):
        raise TypeError("tiermap.jit: pass options by keyword, e.g. tiermap.jit(target='h100')")
    return TiermapJitted(fn, **options)


__all__ = ["CacheInfo", "Lowered", "TiermapError", "TiermapJitted", "jit"]
