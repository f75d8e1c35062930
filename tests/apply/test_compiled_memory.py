"""The plan's predicted device memory against XLA's memory analysis of the applied program."""

from __future__ import annotations

import tiermap
from tiermap.apply.compiled_memory import device_tiers
from tiermap.examples.models import transformer_train


def test_predicted_peak_against_compiled_memory() -> None:
    fn, args = transformer_train(layers=2, seq=64, batch=2)
    lowered = tiermap.jit(fn, target="h100", time_limit_s=10).lower(*args)
    check = lowered.memory_check()
    assert check.device_tiers == ("hbm",) == device_tiers(lowered.plan())
    assert check.compiled_peak_bytes == (check.argument_bytes + check.output_bytes
                                         + check.temp_bytes - check.alias_bytes)
    assert check.platform == "cpu"
    # The step's plan and XLA's buffers agree to within 25% (measured 2026-12-07: 1.05x).
    assert 0.8 <= check.ratio <= 1.25, check.describe()
    assert "x the plan" in check.describe()
