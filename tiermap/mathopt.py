"""What every OR-tools MathOpt solve in tiermap shares (placement, fusion and the capacity LP)."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType
from typing import Any


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 during a solve: HiGHS prints debug lines there directly."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_NATIVE_MODULES = ("ortools.math_opt.python.mathopt", "ortools.math_opt.model_pb2")
_load_lock = threading.Lock()


def load_mathopt() -> ModuleType:
    """Import OR-tools MathOpt so that its native code binds to its own protobuf and abseil.

    Every MathOpt import in tiermap goes through here. The cause it guards against: TensorFlow
    (and so keras-hub) loads `_pywrap_tensorflow_internal` with RTLD_GLOBAL, which puts its own
    build of protobuf's C++ runtime (exported by libtensorflow_framework.so.2) in the process'
    global symbol scope. OR-tools' extension modules, loaded later, then resolve their protobuf
    symbols to TensorFlow's copy instead of the libprotobuf they ship with, and the first C++ ->
    Python model export (`Model.export_model`, called by `mathopt.solve`) dies with SIGSEGV.
    Loading OR-tools' native modules with RTLD_DEEPBIND makes each of them look up symbols in its
    own dependencies first, so they use their own protobuf whatever was loaded before. The flags
    are process-wide, so they are set under a lock and restored at once. If OR-tools was imported
    before tiermap the binding is already made and this returns the module as it is.
    """
    with _load_lock:
        if all(name in sys.modules for name in _NATIVE_MODULES):
            return sys.modules[_NATIVE_MODULES[0]]
        deepbind = getattr(os, "RTLD_DEEPBIND", 0)  # Linux/glibc only; 0 elsewhere
        saved = sys.getdlopenflags() if hasattr(sys, "getdlopenflags") else None
        if saved is not None and deepbind:
            sys.setdlopenflags(os.RTLD_NOW | os.RTLD_LOCAL | deepbind)
        try:
            for name in _NATIVE_MODULES:
                importlib.import_module(name)
        finally:
            if saved is not None and deepbind:
                sys.setdlopenflags(saved)
        return sys.modules[_NATIVE_MODULES[0]]


# --- budgets: what decides where a solve stops --------------------------------------------------


@dataclass(frozen=True)
class WorkBudget:
    """Where a solve stops: a deterministic work limit, and a wall-clock guard.

    The work limit decides the result, the same on any machine: branch-and-bound nodes for
    HiGHS and SCIP (`node_limit`; None: no node limit, e.g. for an LP), and for CP-SAT its
    deterministic time (`deterministic_time`, the solver's own work units). `guard_s` is a
    wall-clock limit that only stops a solve the work limit has not stopped first, on a machine
    far slower or busier than the budgets are sized for; a solve that `guard_fired` can give
    another result on another machine, and the pass that ran it says so in the plan's warnings.
    """

    node_limit: int | None
    deterministic_time: float
    guard_s: float


def solve_parameters(backend: str, seed: int, workers: int, budget: WorkBudget,
                     relative_gap: float | None = None) -> Any:
    """MathOpt `SolveParameters` for `backend` ("highs", "scip" or "cpsat") with `budget`.

    HiGHS takes its thread count and seed as options, not through MathOpt's `threads`, and
    fixes the count process-wide on first use (another count is then an error); its MIP search
    is serial, so it always gets one thread. SCIP runs `workers` threads; CP-SAT with more than
    one worker interleaves its search workers (`interleave_search`), the mode in which its
    parallel search is deterministic.
    """
    mo = load_mathopt()
    params = mo.SolveParameters(time_limit=timedelta(seconds=max(budget.guard_s, 0.05)),
                                random_seed=seed)
    if relative_gap is not None:
        params.relative_gap_tolerance = relative_gap
    if backend == "highs":
        params.highs.int_options["threads"] = 1
        params.highs.int_options["random_seed"] = seed
        params.highs.bool_options["output_flag"] = False
        if budget.node_limit is not None:
            params.node_limit = budget.node_limit
    elif backend == "scip":
        params.threads = workers
        if budget.node_limit is not None:
            params.node_limit = budget.node_limit
    else:
        params.threads = workers
        params.cp_sat.max_deterministic_time = budget.deterministic_time
        if workers > 1:
            params.cp_sat.interleave_search = True
        # occupancy rows count exact bytes: let CP-SAT keep bounds above its 1e7 default
        params.cp_sat.mip_max_bound = 1e15
    return params


def guard_fired(result: Any) -> bool:
    """Whether a MathOpt result stopped at its wall-clock guard (not at its work limit, a gap
    or optimality): its outcome then depends on the machine's speed and load."""
    mo = load_mathopt()
    return bool(result.termination.limit == mo.Limit.TIME)
