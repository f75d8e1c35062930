"""The planning options and their one validator, shared by `plan`, `jit`, the CLI and the passes.

Each check raises `ChoiceError` (a `TiermapError` and a `ValueError`) naming the option, the value
given and what is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tiermap.errors import ChoiceError

STRATEGIES = ("mip", "greedy", "naive")
OBJECTIVES = ("time", "energy")
BACKENDS = ("highs", "scip", "cpsat")
# tiermap/recompute/: where device memory is short, recompute where it beats offload ("auto"),
# recompute whatever device memory needs ("fit"), or never ("off").
RECOMPUTE_MODES = ("auto", "fit", "off")
# The default planning time limit. Every solver stops at a deterministic work limit and the time
# limit is only their wall-clock guard (docs/architecture.md, "Determinism"), so a longer limit
# costs nothing where the work fits and keeps plans the same where it would not: 30 s (before
# 2026-12-08) fired guards on this 2-core VM on a starved GPT-12 training step (d 768, batch 8,
# on h100-4g, 29.5 s), and then the plan depends on the machine's speed.
DEFAULT_TIME_LIMIT_S = 120.0


def check_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ChoiceError unless `value` is one of `choices`."""
    if value not in choices:
        raise ChoiceError(f"{what}={value!r} is not one of: {', '.join(choices)}")


def check_time_limit_s(time_limit_s: Any, what: str = "time_limit_s") -> None:
    """A positive, finite number of seconds."""
    if (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float))
            or not math.isfinite(time_limit_s) or time_limit_s <= 0):
        raise ChoiceError(f"{what}={time_limit_s!r}: expected a positive, finite number "
                          "of seconds")


def check_seed(seed: Any) -> None:
    """A non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ChoiceError(f"seed={seed!r}: expected a non-negative integer")


def check_workers(workers: Any) -> None:
    """None (the backend's default) or a positive integer."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ChoiceError(f"workers={workers!r}: expected a positive integer or None")


def check_positive_int(what: str, value: Any) -> None:
    """A positive integer (counts such as `max_sweeps`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ChoiceError(f"{what}={value!r}: expected a positive integer")


def check_recompute_mode(recompute: Any) -> None:
    """One of RECOMPUTE_MODES."""
    check_choice("recompute", recompute, RECOMPUTE_MODES)


def check_plan_options(strategy: str = "mip", objective: str = "time", backend: str = "highs",
                       time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0,
                       workers: int | None = None) -> None:
    """Every option `tiermap.plan` takes, checked in one place."""
    check_choice("strategy", strategy, STRATEGIES)
    check_choice("objective", objective, OBJECTIVES)
    check_choice("backend", backend, BACKENDS)
    check_time_limit_s(time_limit_s)
    check_seed(seed)
    check_workers(workers)
