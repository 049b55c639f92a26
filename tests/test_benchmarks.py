"""The benchmarks that compare forms compute what they time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_layer_forms_times_forms_that_agree_with_pytorch():
    """Every form of every layer of a 32x32 model is checked against torch's operation
    before it is timed (a wrong form stops the benchmark), and the table lists them all."""
    pytest.importorskip("torch")
    result = subprocess.run(
        [sys.executable, "benchmarks/layer_forms.py", "--resolution=32", "--batch_size=4",
         "--repeats=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    layers = {row.split(" | ")[0] for row in rows[1:]}
    assert layers == {"| 32x32, 3 -> 64", "| 16x16, 64 -> 128", "| 8x8, 128 -> 256"}, layers
    # 4 forms and torch forward and adjoint, 4 and torch kernel gradient: 15 per layer.
    assert len(rows) == 1 + 3 * 15, rows
    assert "picked / torch" in result.stdout
