"""The benchmarks that compare forms compute what they time."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
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


@pytest.mark.slow
def test_conditional_step_benchmark_prints_every_step_and_its_ratios():
    result = subprocess.run(
        [sys.executable, "benchmarks/conditional_step.py", "--resolutions=32",
         "--batch_size=4", "--steps=1", "--repeats=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("  32")]
    assert [row[3] for row in rows] == ["unconditional", "concat+concat,",
                                        "cbn+projection,"], result.stdout
    assert [float(x) for x in rows[0][-2:]] == [1.0, 1.0]  # CPU and wall ratios
    assert all(float(x) > 0 for row in rows[1:] for x in row[-2:])


@pytest.fixture(scope="module")
def torch_cdcgan_samples(tmp_path_factory):
    """The PyTorch cDCGAN's samples after two steps: 20 digits, two of each class."""
    pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("torch_cdcgan") / "samples.npz"
    result = subprocess.run(
        [sys.executable, "benchmarks/torch_cdcgan.py", "--steps=2", "--num_samples=20",
         f"--out={path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ms wall" in result.stdout and "ms CPU per step" in result.stdout, result.stdout
    return path


@pytest.mark.slow
def test_torch_cdcgan_writes_class_balanced_uint8_digits(torch_cdcgan_samples):
    with np.load(torch_cdcgan_samples) as samples:
        assert samples["images"].dtype == np.uint8
        assert samples["images"].shape == (20, 32, 32, 1)
        assert np.bincount(samples["labels"], minlength=10).tolist() == [2] * 10
        assert str(samples["dataset"]) == "demo:mnist"


@pytest.mark.slow
def test_small_data_scores_outside_samples_per_class(torch_cdcgan_samples):
    """An .npz of conditional samples gets the per-class columns, is marked as trained on
    the judge's digits, and has a row of per-class accuracies (as the real floor)."""
    result = subprocess.run(
        [sys.executable, "benchmarks/small_data.py", f"--samples=torch={torch_cdcgan_samples}",
         "--num_samples=20", "--classifier_epochs=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| torch *")]
    assert len(rows) == 2, result.stdout
    scores, per_class = ([cell.strip() for cell in cells] for cells in rows)
    minimum, mean = float(scores[3]), float(scores[4])
    assert 0 <= minimum <= mean <= 1, result.stdout
    assert len(per_class) == 1 + 10 and min(map(float, per_class[1:])) == minimum
    assert "judge's training digits" in result.stdout


@pytest.mark.slow
def test_export_speed_times_every_runtime_beside_sample():
    """Each runtime's images are checked against sample's before they are timed; the table
    has a row per runtime and batch size, and sample files at the largest."""
    pytest.importorskip("onnxruntime")
    result = subprocess.run(
        [sys.executable, "benchmarks/export_speed.py", "--config_name=tests/tiny_config.py",
         "--batch_sizes=1,4", "--repeats=1", "--min_seconds=0.1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    assert [(row[0], row[1]) for row in rows] == [
        (name, batch) for batch in ("1", "4")
        for name in ("sample", "stablehlo", "onnx", "savedmodel")] + [("sample files", "4")]
    assert all(float(row[2].replace(",", "")) > 0 for row in rows)
    assert [row[5] for row in rows if row[0] == "sample"] == ["1.00", "1.00"]


@pytest.mark.slow
def test_metrics_time_prints_every_metric_and_the_totals():
    """All metrics' math, each metric's, the network pass and the per-evaluation totals
    against FID alone, on tiny sizes."""
    result = subprocess.run(
        [sys.executable, "benchmarks/metrics_time.py", "--count=500", "--images=4",
         "--repeats=1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:]
            for line in result.stdout.splitlines() if line.startswith("| ")}
    for name in ("FID alone", "all metrics", "kid alone", "is alone", "pr alone", "dc alone",
                 "mem alone"):
        assert f"{name} (math)" in rows, result.stdout
    assert rows["FID alone (math)"][-1].strip(" |") == "1.00x"
    assert float(rows["total per evaluation: all metrics"][-1].strip(" |x")) > 0
    assert "network 500 fakes, with logits" in rows, result.stdout


@pytest.mark.slow
def test_pixel_scaling_scores_the_same_images_three_ways():
    """Ours, ours with (x-128)/128 pixels and torch-fidelity's own extractor load one state
    dict (random weights, said loudly) and score the same digits: every metric in each row,
    and features that differ from ours' a little, never not at all."""
    pytest.importorskip("torch_fidelity")
    result = subprocess.run(
        [sys.executable, "benchmarks/pixel_scaling.py", "--count=10", "--batch_size=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM WEIGHTS" in result.stdout and "NOTHING" in result.stdout, result.stdout
    rows = {cells[0]: cells[1:] for cells in (
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in result.stdout.splitlines() if line.startswith("| "))}
    ways = ("pytorch-fid (ours)", "(x-128)/128 scaling", "torch-fidelity")
    assert all(way in rows for way in ways), result.stdout
    assert rows["way"][:7] == ["FID", "KID", "IS", "precision", "recall", "density",
                              "coverage"], result.stdout
    assert [float(x) for x in rows[ways[0]][-2:]] == [0.0, 0.0]
    for way in ways[1:]:
        assert all(0 < float(x) < 0.1 for x in rows[way][-2:]), result.stdout
        assert float(rows[way][0]) > 0 and float(rows[way][2]) >= 1
