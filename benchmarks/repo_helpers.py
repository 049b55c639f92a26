"""The repository's tests/helpers.py (random Inception weights and the like) for benchmarks."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType


def load_test_helpers() -> ModuleType:
    """tests/helpers.py, by path: a `tests` package of some dependency could shadow ours."""
    spec = importlib.util.spec_from_file_location("helpers", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "helpers.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers
