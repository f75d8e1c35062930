"""Shared test setup: make the repository's `examples/` and `tests/zoo.py` importable."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
# Appended (not prepended) so that test packages such as tests/costmodel keep precedence over the
# source folders of the same name at the repository root.
for _path in (str(_TESTS), str(_TESTS.parent)):
    if _path not in sys.path:
        sys.path.append(_path)
