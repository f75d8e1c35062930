"""OR-tools MathOpt loading (tiermap/mathopt.py): native code bound to its own protobuf."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiermap.mathopt import load_mathopt

PACKAGE = Path(__file__).resolve().parents[2] / "tiermap"


def test_load_mathopt_returns_the_module_and_restores_the_dlopen_flags() -> None:
    before = sys.getdlopenflags()
    mo = load_mathopt()
    assert sys.getdlopenflags() == before
    assert mo is sys.modules["ortools.math_opt.python.mathopt"]
    m = mo.Model(name="t")
    x = m.add_binary_variable(name="x")
    m.maximize(x)
    assert mo.solve(m, mo.SolverType.HIGHS).objective_value() == pytest.approx(1.0)


def test_every_mathopt_import_goes_through_load_mathopt() -> None:
    """A direct import could be the first to load OR-tools' native code, without RTLD_DEEPBIND."""
    direct = re.compile(r"^\s*(from ortools\.math_opt\.python import|import ortools)", re.M)
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "mathopt.py" and direct.search(p.read_text())]
    assert offenders == []


_PLAN_AFTER_TENSORFLOW = """
import tensorflow  # loads its own protobuf C++ runtime with RTLD_GLOBAL
import tiermap
from tiermap.examples import models
fn, args = models.attention(n=256)
plan = tiermap.plan(fn, *args, target="h100", time_limit_s=10, workers=1)
print("predicted_time_s", plan.predicted_time_s)
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="needs TensorFlow in the environment (the clash is TensorFlow's "
                           "protobuf C++ runtime; it cannot be reproduced without it)")
def test_planning_with_tensorflow_imported_first_does_not_crash() -> None:
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", _PLAN_AFTER_TENSORFLOW], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "predicted_time_s" in done.stdout
