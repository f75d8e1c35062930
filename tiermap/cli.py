"""The `tiermap` command: `targets`, `compile` and `calibrate` (with `--check`).

Exit codes: 0 success; 2 bad input (usage, a missing file or function, an unknown target or a
target file with mistakes, a malformed --arg, an unsupported program, an exception raised by the
user's own code, any other deliberate tiermap error, which names the fix); 3 infeasible (the
program does not fit the target); 4 `calibrate --check --strict` ran but a fidelity goal was
not met (without `--strict` the check exits 0 whatever its figures); 1 a failed compiler pass (an
internal error of tiermap). Errors print one "tiermap: error: ..." message on stderr, without a
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

import tiermap
from tiermap import __version__
from tiermap.as_run import plan_as_run
from tiermap.costmodel import fidelity
from tiermap.costmodel.calibration import calibrate, target_to_toml
from tiermap.costmodel.fidelity import GOALS
from tiermap.costmodel.fidelity_suites import SUITES, suite
from tiermap.errors import (
    HardwareSpecError,
    InfeasiblePlacementError,
    PassError,
    TiermapError,
    UnsupportedProgramError,
    UserCodeError,
)
from tiermap.formatting import (
    fmt_bytes,
    fmt_flops_per_s,
    fmt_rate_bytes_per_s,
    fmt_time_s,
    write_atomic,
)
from tiermap.ir.decisions import Decision, decision_counts
from tiermap.ir.untaken import Untaken
from tiermap.options import DEFAULT_TIME_LIMIT_S, OBJECTIVES, RECOMPUTE_MODES, STRATEGIES
from tiermap.plots import fidelity as fidelity_plot
from tiermap.plots import save_figure, save_plots
from tiermap.report import plan_summary, rich_summary
from tiermap.trace import trace_json

if TYPE_CHECKING:
    from rich.console import Console

    from tiermap.hardware.target import Target
    from tiermap.ir.plan import Plan
    from tiermap.ir.program import Program

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3
EXIT_CHECK_FAILED = 4

# Short dtype names accepted by --arg, and the numpy/jax names they stand for.
ARG_DTYPES: dict[str, str] = {
    "f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64",
    "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
    "bool": "bool", "pred": "bool", "i1": "bool",
}
_ARG_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*\[\s*([0-9,\s]*)\]\s*$")

# What --out-dir writes, by output kind.
OUT_DIR_FILES = {"plan": "plan.json", "mlir": "annotated.mlir", "trace": "trace.json",
                 "report": "report.md", "plots": "."}


class UsageError(Exception):
    """Bad input on the command line or in the user's files: exit 2 with the message."""


class _Parser(argparse.ArgumentParser):
    """argparse with "tiermap: error: ..." messages and exit code 2 for usage errors."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"tiermap: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


# --- argument parsing ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `tiermap` command."""
    parser = _Parser(prog="tiermap", description=(
        "Map a JAX program's tensors to memory tiers (SRAM, HBM, DDR, flash) for a hardware "
        "target."), epilog="Exit codes: 0 ok, 2 bad input, 3 does not fit the target.")
    parser.add_argument("--version", action="version", version=f"tiermap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p_targets = sub.add_parser("targets", help="list the built-in targets (or check target files)",
                               description="List targets: name, tiers, capacities, bandwidths.")
    p_targets.add_argument("names", nargs="*", metavar="TARGET",
                           help="built-in names or .toml files to show (default: all built-ins)")
    p_targets.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p_compile = sub.add_parser(
        "compile", help="plan a program for a target",
        description="Plan where every tensor of a program lives on a target.",
        epilog="FILE.py:NAME with --arg: NAME is the function, each --arg one positional "
               "array. Without --arg: NAME() is a builder returning (fn, args) or "
               "(fn, args, kwargs). FILE.mlir: any StableHLO module.")
    p_compile.add_argument("program", metavar="FILE.py:NAME | FILE.mlir")
    p_compile.add_argument("--arg", action="append", default=[], metavar="DTYPE[SHAPE]",
                           help="one positional array argument, e.g. f32[1024,64] (repeat)")
    p_compile.add_argument("--target", "-t", required=True, metavar="T",
                           help="built-in target name or a .toml target file")
    p_compile.add_argument("--strategy", choices=STRATEGIES, default="mip")
    p_compile.add_argument("--time-limit-s", type=_positive_float, default=DEFAULT_TIME_LIMIT_S,
                           metavar="S",
                           help="planning time limit in seconds, the solvers' wall-clock guard "
                                f"(default {DEFAULT_TIME_LIMIT_S:g}; their work limits decide "
                                "the plan)")
    p_compile.add_argument("--seed", type=int, default=0)
    p_compile.add_argument("--capacity-bound", action="store_true",
                           help="also solve the capacity LP for a lower bound that holds tier "
                                "capacities over time (tighter where a tier binds; 15-50 s on "
                                "4k-op programs, taken out of the time limit)")
    p_compile.add_argument("--objective", choices=OBJECTIVES, default="time")
    p_compile.add_argument("--assumed-trip-count", type=int, default=1, metavar="N",
                           help="trips of a loop whose bound is not static (default 1; the "
                                "report says it was assumed)")
    p_compile.add_argument("--recompute", choices=RECOMPUTE_MODES, default="auto",
                           help="drop stored tensors where device memory is short and compute "
                                "them again: where it beats moving them to host (auto, the "
                                "default), whatever device memory needs (fit), or never (off)")
    p_compile.add_argument("--memory-check", action="store_true",
                           help="FILE.py:NAME only: compile the program as applied on this "
                                "machine and compare the plan's peak device memory with XLA's "
                                "memory analysis (in the report, the summary and --json)")
    p_compile.add_argument("-o", "--output", metavar="PLAN.json", help="write the plan JSON")
    p_compile.add_argument("--mlir", metavar="OUT.mlir", help="write the annotated StableHLO")
    p_compile.add_argument("--trace", metavar="TRACE.json",
                           help="write the predicted timeline (Chrome/Perfetto trace JSON)")
    p_compile.add_argument("--trace-iterations", choices=("first", "all"), default="first",
                           help="loops in the trace: the first iteration expanded (default) "
                                "or every one")
    p_compile.add_argument("--report", metavar="REPORT.md", help="write the markdown report")
    p_compile.add_argument("--plots", metavar="DIR", help="write the charts (PNG) into DIR")
    p_compile.add_argument("--out-dir", metavar="DIR", help=(
        "write everything into DIR: plan.json, annotated.mlir, trace.json, report.md, charts"))
    p_compile.add_argument("--json", action="store_true",
                           help="print a machine-readable summary on stdout")

    p_cal = sub.add_parser("calibrate", help="measure this machine into a target file",
                           description="Measure this CPU's peaks and bandwidths with JAX.")
    p_cal.add_argument("-o", "--output", metavar="FILE.toml",
                       help="write the target file here (default: print it)")
    p_cal.add_argument("--quick", action="store_true",
                       help="small sizes and few repeats (seconds; rough figures)")
    p_cal.add_argument("--check", action="store_true", help=(
        "then run the held-out op suite on the calibrated target and print predicted vs "
        "measured per op (the cost model's fidelity)"))
    p_cal.add_argument("--target", metavar="FILE.toml", help=(
        "with --check: check this calibrated target file instead of calibrating now"))
    p_cal.add_argument("--suite", choices=SUITES, default="blind",
                       help="with --check: the op suite (default blind)")
    p_cal.add_argument("--rounds", type=_positive_int, default=9, metavar="N",
                       help="with --check: best of N timing rounds (default 9)")
    p_cal.add_argument("--repeats", type=_positive_int, default=2, metavar="N",
                       help="with --check: measure the suite N times (default 2)")
    p_cal.add_argument("--no-wait", action="store_true", help=(
        "with --check: do not wait for idle CPUs before each timing batch (faster, noisier)"))
    p_cal.add_argument("--plot", metavar="FILE.png",
                       help="with --check: plot predicted against measured")
    p_cal.add_argument("--strict", action="store_true", help=(
        f"with --check: exit {EXIT_CHECK_FAILED} when a goal (median |log2 err| <= "
        f"{GOALS.median_abs_log2}, Spearman >= {GOALS.spearman}, none off by > 2x) fails"))
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def parse_arg_spec(text: str) -> Any:
    """`f32[1024,64]` → `jax.ShapeDtypeStruct((1024, 64), float32)`; `i32[]` is a scalar.

    Raises:
        UsageError: the text is not DTYPE[SHAPE] or names an unknown dtype.
    """
    import jax
    import jax.numpy as jnp

    known = ", ".join(ARG_DTYPES)
    match = _ARG_RE.match(text)
    if match is None:
        raise UsageError(f"--arg {text!r}: expected DTYPE[SHAPE], e.g. f32[1024,64] or i32[] "
                         f"(dtypes: {known})")
    name, dims = match.group(1), match.group(2).strip()
    dtype_name = ARG_DTYPES.get(name.lower(), name)
    try:
        dtype = jnp.dtype(dtype_name)
    except TypeError:
        raise UsageError(f"--arg {text!r}: unknown dtype {name!r} (dtypes: {known})") from None
    parts = [d.strip() for d in dims.split(",")] if dims else []
    if any(not d for d in parts):
        raise UsageError(f"--arg {text!r}: empty dimension; write e.g. f32[1024,64]")
    return jax.ShapeDtypeStruct(tuple(int(d) for d in parts), dtype)


# --- user files ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _user_paths(folder: Path) -> Iterator[None]:
    """Put the user's folder and the working directory first on sys.path while importing."""
    added = [p for p in (str(folder), os.getcwd()) if p not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)


def _module_name(path: Path) -> tuple[str, Path]:
    """Dotted module name of `path` (through enclosing packages) and the folder to import from."""
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file() and folder.parent != folder:
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts), folder


def import_user_file(path_text: str) -> Any:
    """Import a user's .py file (its folder and the working directory on sys.path).

    Raises:
        UsageError: the file is missing, not Python, or raises while being imported.
    """
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"{path_text}: no such file")
    if path.suffix != ".py":
        raise UsageError(f"{path_text}: expected a .py file (FILE.py:NAME) or a .mlir file")
    path = path.resolve()
    name, root = _module_name(path)
    try:
        with _user_paths(root):
            if "." in name:
                importlib.invalidate_caches()
                module = importlib.import_module(name)
                if Path(getattr(module, "__file__", "") or "").resolve() != path:
                    raise UsageError(f"{path_text}: importing it as {name} found another "
                                     f"module ({module.__file__}); rename one of them")
                return module
            spec = importlib.util.spec_from_file_location(f"tiermap_user_{name}", path)
            if spec is None or spec.loader is None:
                raise UsageError(f"{path_text}: cannot be imported as a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
    except UsageError:
        raise
    except SyntaxError as exc:
        where = f"{exc.filename}:{exc.lineno}" if exc.lineno else path_text
        raise UsageError(f"{where}: syntax error: {exc.msg}") from None
    except Exception as exc:  # the user's module raised while importing
        raise UsageError(f"{path_text} raised {type(exc).__name__} while being imported: "
                         f"{exc}{_user_frame(exc, path)}") from None


def _user_frame(exc: BaseException, path: Path) -> str:
    """" (at FILE:LINE)" for the deepest frame of the traceback inside the user's file."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).resolve() == path]
    return f" (at {path.name}:{frames[-1].lineno})" if frames else ""


def _public_callables(module: Any) -> list[str]:
    return sorted(n for n, v in vars(module).items()
                  if callable(v) and not n.startswith("_") and not inspect.isclass(v)
                  and getattr(v, "__module__", None) == module.__name__)


@dataclass(frozen=True)
class _UserProgram:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    label: str


def load_user_program(spec: str, arg_specs: Sequence[str]) -> _UserProgram:
    """Resolve FILE.py:NAME (with --arg specs, or a zero-argument builder) to fn and args."""
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise UsageError(f"{spec!r}: expected FILE.py:NAME (a function or a builder in FILE.py) "
                         "or FILE.mlir")
    args = tuple(parse_arg_spec(a) for a in arg_specs)
    module = import_user_file(path_text)
    obj = getattr(module, name, None)
    if obj is None:
        found = ", ".join(_public_callables(module)) or "none"
        raise UsageError(f"{path_text}: no function {name!r} (functions defined there: {found})")
    if not callable(obj):
        raise UsageError(f"{path_text}:{name} is a {type(obj).__name__}, not a function")
    if args:
        return _UserProgram(obj, args, {}, f"{name}({', '.join(arg_specs)})")
    required = _required_params(obj)
    if required:
        raise UsageError(
            f"{path_text}:{name} takes parameters ({', '.join(required)}); pass one "
            f"--arg DTYPE[SHAPE] per positional parameter, or name a zero-argument builder "
            "that returns (fn, args)")
    try:
        built = obj()
    except Exception as exc:
        raise UsageError(f"{name}() raised {type(exc).__name__}: {exc}"
                         f"{_user_frame(exc, Path(path_text).resolve())}") from None
    shape_hint = ("a builder returns (fn, args) or (fn, args, kwargs); or pass --arg to "
                  f"compile {name} itself")
    if not isinstance(built, tuple | list) or len(built) not in (2, 3):
        raise UsageError(f"{name}() returned {type(built).__name__}; {shape_hint}")
    fn, fn_args = built[0], built[1]
    fn_kwargs = built[2] if len(built) == 3 else {}
    if not callable(fn):
        raise UsageError(f"{name}() returned {type(fn).__name__} as fn; {shape_hint}")
    if not isinstance(fn_args, tuple | list):
        raise UsageError(f"{name}() returned args of type {type(fn_args).__name__}; "
                         f"{shape_hint} with args a tuple")
    if not isinstance(fn_kwargs, dict):
        raise UsageError(f"{name}() returned kwargs of type {type(fn_kwargs).__name__}; "
                         f"{shape_hint} with kwargs a dict")
    label = getattr(fn, "__name__", name)
    return _UserProgram(fn, tuple(fn_args), dict(fn_kwargs), label)


def _required_params(fn: Any) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


# --- progress ------------------------------------------------------------------------------------


class _Steps:
    """A spinner with the current step and its elapsed time on stderr, shown only when stderr is
    a terminal; it disappears when done."""

    def __init__(self, err: IO[str], enabled: bool) -> None:
        self._progress: Any = None
        self._task: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.table import Column

            text = TextColumn("{task.description}", table_column=Column(
                ratio=1, no_wrap=True, overflow="ellipsis"))
            self._progress = Progress(SpinnerColumn(), TimeElapsedColumn(), text, transient=True,
                                      expand=True,
                                      console=Console(file=err, stderr=True))

    def __enter__(self) -> _Steps:
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def step(self, text: str) -> None:
        """Start timing a new step (the previous one is done)."""
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(text, total=None)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _console(stream: IO[str]) -> Console:
    from rich.console import Console

    tty = _is_tty(stream)
    return Console(file=stream, width=None if tty else 120, no_color=not tty,
                   highlight=False, soft_wrap=False)


# --- commands ------------------------------------------------------------------------------------


def _target_dict(t: Target) -> dict[str, Any]:
    return {
        "name": t.name, "description": t.description, "platform": t.platform, "units": t.units,
        "peak_flops_per_s": dict(t.peak_flops_per_s), "op_overhead_s": t.op_overhead_s,
        "tiers": [{"name": x.name, "capacity_bytes": x.capacity_bytes, "per_unit": x.per_unit,
                   "holds_tensors": x.holds_tensors, "read_only": x.read_only,
                   "read_bytes_per_s": x.read_bytes_per_s,
                   "write_bytes_per_s": x.write_bytes_per_s} for x in t.tiers],
        "links": [{"src": lk.src, "dst": lk.dst, "bytes_per_s": lk.bytes_per_s}
                  for lk in t.links],
        "path": t.path,
    }


def cmd_targets(ns: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """`tiermap targets`: a table (or JSON) of targets with tiers, capacities and bandwidths."""
    names = ns.names or tiermap.targets()
    loaded = [tiermap.target(n) for n in names]
    if ns.json:
        out.write(json.dumps({"schema": "tiermap.targets/v1",
                              "targets": [_target_dict(t) for t in loaded]}, indent=1) + "\n")
        return EXIT_OK
    from rich.table import Table

    table = Table(title="tiermap targets (tiers fastest first)", title_justify="left")
    for col, just in (("target", "left"), ("platform", "left"), ("peak", "right"),
                      ("tier", "left"), ("capacity", "right"), ("read", "right"),
                      ("write", "right"), ("role", "left")):
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for t in loaded:
        peak_dtype = next((d for d in ("bf16", "f16", "f32") if d in t.peak_flops_per_s),
                          max(t.peak_flops_per_s, key=lambda d: t.peak_flops_per_s[d]))
        peak = f"{fmt_flops_per_s(t.peak_flops_per_s[peak_dtype])} {peak_dtype}"
        for i, tier in enumerate(t.tiers):
            role = ("weights only" if tier.read_only else
                    "residency" if tier.holds_tensors else "scratch")
            if tier.per_unit:
                role += f", {fmt_bytes(tier.capacity_bytes / max(t.units, 1))}/unit"
            table.add_row(t.name if i == 0 else "", t.platform if i == 0 else "",
                          peak if i == 0 else "", tier.name, fmt_bytes(tier.capacity_bytes),
                          fmt_rate_bytes_per_s(tier.read_bytes_per_s),
                          fmt_rate_bytes_per_s(tier.write_bytes_per_s), role,
                          end_section=i == len(t.tiers) - 1)
    _console(out).print(table)
    return EXIT_OK


def _output_paths(ns: argparse.Namespace) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    if ns.out_dir:
        folder = Path(ns.out_dir)
        paths = {kind: folder / name for kind, name in OUT_DIR_FILES.items()}
        paths["plots"] = folder
    for kind, value in (("plan", ns.output), ("mlir", ns.mlir), ("trace", ns.trace),
                        ("report", ns.report), ("plots", ns.plots)):
        if value:
            paths[kind] = Path(value)
    return paths


def cmd_compile(ns: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """`tiermap compile`: plan a program; print the summary; write the requested outputs."""
    if ns.program.endswith((".mlir", ".stablehlo")) and ns.arg:
        raise UsageError("--arg applies to FILE.py:NAME; a .mlir module has its own types")
    paths = _output_paths(ns)
    with _Steps(err, enabled=_is_tty(err)) as steps:
        steps.step(f"loading target {ns.target}")
        target = tiermap.target(ns.target)
        program: Program
        user: _UserProgram | None = None
        if ns.program.endswith((".mlir", ".stablehlo")):
            if not Path(ns.program).is_file():
                raise UsageError(f"{ns.program}: no such file")
            steps.step(f"reading {ns.program}")
            program = tiermap.lower_mlir(ns.program, platform=target.platform)
        else:
            steps.step(f"importing {ns.program}")
            user = load_user_program(ns.program, ns.arg)
            steps.step(f"tracing {user.label} for platform {target.platform}")
            program = tiermap.lower(user.fn, *user.args, platform=target.platform,
                                    **user.kwargs)
        steps.step(f"planning {program.name}: {program.num_steps} ops on {target.name} "
                   f"({ns.strategy}, time limit {ns.time_limit_s:g} s)")
        plan = tiermap.plan(program, target=target, strategy=ns.strategy,
                            time_limit_s=ns.time_limit_s, seed=ns.seed, objective=ns.objective,
                            capacity_bound=ns.capacity_bound,
                            assumed_trip_count=ns.assumed_trip_count, recompute=ns.recompute)
        decisions: list[Decision] | None = None
        if user is not None:
            steps.step("tracing the program as applied (which plan decisions it realises)")
            traced = user

            def replan(untaken: Untaken) -> tiermap.Plan:
                steps.step("planning again without the decisions the applied program does "
                           "not realise")
                return tiermap.plan(program, target=target, strategy=ns.strategy,
                                    time_limit_s=ns.time_limit_s, seed=ns.seed,
                                    objective=ns.objective, capacity_bound=ns.capacity_bound,
                                    assumed_trip_count=ns.assumed_trip_count,
                                    recompute=ns.recompute, untaken=untaken)

            plan = plan_as_run(plan, _applied_decisions(traced, plan), replan,
                               lambda p: _applied_decisions(traced, p)).plan
            decisions = list(plan.decisions)
        memory: Any = None
        if ns.memory_check:
            if user is None:
                raise UsageError("--memory-check needs FILE.py:NAME (a JAX function to apply)")
            steps.step("compiling the program as applied (its memory analysis)")
            memory = _memory_check(user, plan)
        compare: dict[str, Plan] = {}
        if "plots" in paths:
            for other in ("naive", "greedy"):
                if other != ns.strategy:
                    steps.step(f"planning the {other} baseline for the traffic chart")
                    compare[other] = tiermap.plan(program, target=target, strategy=other,
                                                  time_limit_s=ns.time_limit_s, seed=ns.seed,
                                                  objective=ns.objective,
                                                  assumed_trip_count=ns.assumed_trip_count,
                                                  recompute=ns.recompute)
        written: dict[str, str] = {}
        writers: dict[str, Callable[[], str]] = {
            "plan": plan.to_json, "mlir": plan.annotated_mlir,
            "trace": lambda: trace_json(plan, ns.trace_iterations),
            "report": lambda: plan.report(
                decisions, memory.describe() if memory is not None else None),
        }
        for kind, make in writers.items():
            if kind in paths:
                steps.step(f"writing {paths[kind]}")
                write_atomic(paths[kind], make())
                written[kind] = str(paths[kind])
        if "plots" in paths:
            steps.step(f"drawing charts into {paths['plots']}")
            for name, chart in save_plots(plan, paths["plots"], compare=compare).items():
                written[f"plot:{Path(name).stem}"] = str(chart)
    if ns.json:
        summary = plan_summary(plan, written, decisions)
        if memory is not None:
            summary["memory_check"] = {**dataclasses.asdict(memory), "ratio": memory.ratio}
        out.write(json.dumps(summary, indent=1) + "\n")
        return EXIT_OK
    console = _console(out)
    console.print(rich_summary(plan))
    if decisions is not None:
        counts = decision_counts(decisions)
        parts = [f"{kind} {done} applied, {left} not" for kind, (done, left) in counts.items()]
        away = sum(not d.priced for d in decisions)
        if away:
            parts.append(f"{away} planned away (the applied program does not realise them)")
        console.print("plan decisions as applied: " + ("; ".join(parts) or "none to apply")
                      + (" (the report lists each)" if "report" in written else ""))
    if memory is not None:
        console.print(memory.describe())
    for kind, where in written.items():
        console.print(f"wrote {kind:<15} {where}")
    return EXIT_OK


def _memory_check(user: _UserProgram, plan: Plan) -> Any:
    """The plan's peak device memory against XLA's memory analysis of the program as applied
    (`tiermap.apply.compiled_memory`), compiled on this machine."""
    # local import: tiermap.apply imports jax at module level; the CLI's start stays cheap
    from tiermap.apply import lower_applied

    # local import: the same package (tiermap.apply)
    from tiermap.apply.compiled_memory import memory_check

    return memory_check(plan, lower_applied(user.fn, plan, *user.args, planned_only=True,
                                            **user.kwargs))


def _applied_decisions(user: _UserProgram, plan: Plan) -> list[Decision]:
    """The plan's decisions as the applied program has them (`tiermap.apply`), traced on the
    user's arguments."""
    # local import: tiermap.apply imports jax at module level; the CLI's start stays cheap
    from tiermap.apply import applied_decisions

    return applied_decisions(user.fn, plan, *user.args, **user.kwargs)


def cmd_calibrate(ns: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """`tiermap calibrate`: measure this CPU into a schema-v1 target file; with `--check`, then
    run the fidelity check on it (or on `--target`)."""
    check_only = ("--target", "--plot", "--strict", "--no-wait") if not ns.check else ()
    for flag in check_only:
        if getattr(ns, flag.lstrip("-").replace("-", "_")):
            raise UsageError(f"{flag} needs --check; fix: add --check or leave {flag} out")
    if ns.check and ns.target:
        if ns.output:
            raise UsageError("-o and --target exclude each other: --target checks a file "
                             "calibrated before; fix: leave one of them out")
        return _calibrate_check(tiermap.target(ns.target), ns, out, err)
    target = _measure_target(ns, err)
    text = target_to_toml(target)
    if not ns.output:
        if not ns.check:
            out.write(text)
            return EXIT_OK
    else:
        write_atomic(ns.output, text)
        tiers = ", ".join(f"{t.name} {fmt_bytes(t.capacity_bytes)} at "
                          f"{fmt_rate_bytes_per_s(t.read_bytes_per_s)}" for t in target.tiers)
        peaks = ", ".join(f"{k} {v:.3g}" for k, v in target.peak_flops_per_s.items())
        out.write(f"wrote {ns.output}: target {target.name!r}; peak FLOP/s {peaks}; "
                  f"tiers {tiers}\n")
    return _calibrate_check(target, ns, out, err) if ns.check else EXIT_OK


def _measure_target(ns: argparse.Namespace, err: IO[str]) -> Target:
    if not _is_tty(err):
        return calibrate(quick=ns.quick)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<32}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  console=Console(file=err, stderr=True), transient=True) as bar:
        task = bar.add_task("calibrating", total=1.0)

        def progress(label: str, fraction: float) -> None:
            bar.update(task, description=label, completed=fraction)

        return calibrate(progress=progress, quick=ns.quick)


def _calibrate_check(target: Target, ns: argparse.Namespace, out: IO[str], err: IO[str]
                     ) -> int:
    """`calibrate --check`: the held-out suite predicted on `target` and measured here."""
    from rich.table import Table

    if target.platform != "cpu":
        raise UsageError(f"target {target.name!r} is for platform {target.platform!r}; the "
                         "check measures this CPU; fix: give a target from tiermap calibrate")
    with _Steps(err, enabled=_is_tty(err)) as steps:
        result = fidelity.check(target, suite(ns.suite), suite=ns.suite, rounds=ns.rounds,
                                repeats=ns.repeats, quiet=not ns.no_wait,
                                progress=steps.step)
    console = _console(out)
    if not target.working_set_tiers:
        console.print(f"note: {target.name!r} is not a calibrated target (no "
                      "working_set_tiers): it is checked with the plain roofline")
    table = Table(title=f"cost model fidelity: {ns.suite} suite on {target.name}, best of "
                        f"{ns.rounds} rounds")
    for head in ("op", "shape", "predicted"):
        table.add_column(head)
    for r in range(ns.repeats):
        table.add_column(f"measured {r + 1}", justify="right")
        table.add_column(f"log2 err {r + 1}", justify="right")
    table.add_column("bound")
    for i, (case, pred) in enumerate(zip(result.cases, result.predictions, strict=True)):
        cells = [case.op, case.shape, fmt_time_s(pred.time_s)]
        for run in result.measured_s:
            cells += [fmt_time_s(run[i]), f"{math.log2(pred.time_s / run[i]):+.2f}"]
        table.add_row(*cells, pred.bound)
    console.print(table)
    for r, stat in enumerate(result.stats):
        console.print(
            f"repeat {r + 1}: median |log2 err| {stat.median_abs_log2:.3f} (goal <= "
            f"{GOALS.median_abs_log2}), Spearman {stat.spearman:.3f} (goal >= {GOALS.spearman}),"
            f" worst {stat.worst} {2 ** abs(stat.worst_log2):.2f}x (goal <= 2x), "
            f"{stat.over_2x} off by > 2x: goals {'met' if stat.meets() else 'NOT met'}")
    if ns.plot:
        console.print(f"wrote plot {save_figure(fidelity_plot(result), ns.plot)}")
    return EXIT_CHECK_FAILED if ns.strict and not result.meets() else EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, IO[str], IO[str]], int]] = {
    "targets": cmd_targets, "compile": cmd_compile, "calibrate": cmd_calibrate,
}


def _fail(err: IO[str], message: str, code: int) -> int:
    err.write(f"tiermap: error: {message.rstrip()}\n")
    return code


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None,
         err: IO[str] | None = None) -> int:
    """Run the `tiermap` command; returns the exit code (the console script exits with it)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        with contextlib.redirect_stderr(err):
            ns = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_BAD_INPUT
    try:
        return COMMANDS[ns.command](ns, out, err)
    except UsageError as exc:
        return _fail(err, str(exc), EXIT_BAD_INPUT)
    except HardwareSpecError as exc:
        if len(exc.problems) == 1:
            return _fail(err, f"{exc.source}: {exc.problems[0]}", EXIT_BAD_INPUT)
        return _fail(err, str(exc), EXIT_BAD_INPUT)
    except UnsupportedProgramError as exc:
        return _fail(err, f"unsupported program: {exc}", EXIT_BAD_INPUT)
    except UserCodeError as exc:
        return _fail(err, f"{exc}{_user_code_frame(exc)}", EXIT_BAD_INPUT)
    except InfeasiblePlacementError as exc:
        return _fail(err, f"does not fit: {exc}", EXIT_INFEASIBLE)
    except PassError as exc:
        return _fail(err, f"{exc} (an internal error of tiermap; please report it)",
                     EXIT_INTERNAL)
    except TiermapError as exc:  # any other deliberate error names the culprit and the fix
        return _fail(err, str(exc), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return _fail(err, "interrupted", 130)
    except OSError as exc:
        return _fail(err, f"{exc.filename or ''}: {exc.strerror or exc}", EXIT_BAD_INPUT)


def _library_dirs() -> tuple[str, ...]:
    """Folders of tiermap's packages and of jax, whose frames are not the user's code."""
    dirs = set()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.split(".")[0] in ("tiermap", "jax", "jaxlib") and file:
            dirs.add(os.path.dirname(os.path.abspath(file)) + os.sep)
    return tuple(sorted(dirs))


def _user_code_frame(exc: UserCodeError) -> str:
    """" (at file.py:LINE)" for the innermost frame of the user's exception outside libraries."""
    skip = _library_dirs()
    frames = [f for f in traceback.extract_tb(exc.original.__traceback__)
              if not os.path.abspath(f.filename).startswith(skip)
              and "site-packages" not in f.filename and not f.filename.startswith("<")]
    if not frames:
        return ""
    return f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
