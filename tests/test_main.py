"""The command line end to end: outputs, resume, SIGTERM, non-finite losses, init_from."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dcgan_jax import checkpoints, parallel
from dcgan_jax import step as step_lib

from helpers import REPO, main_args, random_image_folder, run, subprocess_env

PROGRESS = re.compile(
    r"^\[\d\d:\d\d:\d\d\] epoch \d+/\d+ step (\d+)/(\d+) \| loss_D [\d.]+ loss_G [\d.]+ "
    r"D\(x\) [\d.]+ D\(G\(z\)\) [\d.]+/[\d.]+ \| [\d.]+ step/s \d+ img/s \| ETA ", re.M)


def restore_state(workdir, step=None):
    config = checkpoints.read_run_config(str(workdir))
    mesh = parallel.make_mesh()
    manager = checkpoints.make_manager(str(workdir), read_only=True)
    state = checkpoints.restore(manager, step_lib.abstract_train_state(config, mesh, 1), step)
    return jax.tree.map(np.asarray, state)


def params_of(state):
    return jax.tree.leaves((state.g.params, state.d.params, state.g.batch_stats,
                            state.d.batch_stats, state.ema))


@pytest.mark.slow
def test_end_to_end_outputs(tmp_path):
    result = run(main_args(tmp_path, **{"train.ema_decay": 0.5}))
    out = result.stdout
    assert "Config:" in out and "train.ema_decay" in out
    assert "Devices: 1 x cpu" in out
    assert re.search(r"Generator: [\d,]+ parameters", out)
    assert re.search(r"Discriminator: [\d,]+ parameters", out)
    assert [m.group(1) for m in PROGRESS.finditer(out)] == ["2", "4", "6"]

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["ema_decay"] == 0.5 and config["model"]["resolution"] == 32

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6]
    for key in ("loss_d", "loss_g", "d_real", "d_fake_before", "d_fake_after", "lr_d", "lr_g",
                "steps_per_sec", "images_per_sec", "epoch"):
        assert all(np.isfinite(line[key]) for line in lines), key
    assert lines[-1]["lr_d"] == pytest.approx(2e-4)

    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    samples = sorted(os.listdir(tmp_path / "samples"))
    assert samples == ["real.png", "step_0000003.png", "step_0000003_ema.png",
                       "step_0000006.png", "step_0000006_ema.png"]
    from PIL import Image
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_0000006.png"))
    assert grid.shape == (4 * 34 + 2, 4 * 34 + 2) and grid.std() > 0
    real = np.asarray(Image.open(tmp_path / "samples" / "real.png"))
    assert real.shape == grid.shape and real.max() == 255

    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    state = restore_state(tmp_path)
    assert int(state.step) == 6 and state.ema is not None


@pytest.mark.slow
def test_resume_matches_an_unbroken_run_and_four_devices_match_one(tmp_path):
    """Prepared data, flips on the device and two D updates per step: 4 + 4 steps equal 8,
    and 4 simulated devices train as one does."""
    unbroken, resumed, four = tmp_path / "unbroken", tmp_path / "resumed", tmp_path / "four"
    overrides = {"train.num_steps": 8, "ckpt_every": 4, "train.ema_decay": 0.9,
                 "data.random_flip": True, "train.d_steps": 2}
    run(main_args(unbroken, **overrides))
    run(main_args(resumed, **{**overrides, "train.num_steps": 4}))
    second = run(main_args(resumed, **overrides))
    assert "Resumed from step 4" in second.stdout
    a, b = restore_state(unbroken, 8), restore_state(resumed, 8)
    for x, y in zip(params_of(a), params_of(b), strict=True):
        np.testing.assert_array_equal(x, y)
    steps = [json.loads(line)["step"]
             for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    run(main_args(four, **{**overrides, "train.num_steps": 4}), devices=4)
    one, many = restore_state(unbroken, 4), restore_state(four, 4)
    for x, y in zip(params_of(one), params_of(many), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sigterm_saves_and_the_next_run_continues(tmp_path):
    args = main_args(tmp_path, **{"train.num_steps": 100000, "ckpt_every": 100000,
                                  "sample_every": 100000})
    stderr = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=stderr)
    deadline = time.time() + 240
    for line in proc.stdout:
        if PROGRESS.match(line) or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    stderr.seek(0)
    assert proc.returncode == 0, stderr.read()[-3000:]
    stopped = int(re.search(r"Stopped at step (\d+); checkpoint saved", out).group(1))
    assert os.listdir(tmp_path / "checkpoints") == [str(stopped)]
    assert int(restore_state(tmp_path).step) == stopped

    again = run(main_args(tmp_path, **{"train.num_steps": stopped + 2}))
    assert f"Resumed from step {stopped}" in again.stdout
    assert f"Done: {stopped + 2} steps" in again.stdout


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run(main_args(tmp_path, **{"train.num_steps": 2, "ckpt_every": 2}))
    # Resumed with absurd learning rates, the weights overflow within a few steps.
    result = run(main_args(tmp_path, **{"train.lr_d": 1e30, "train.lr_g": 1e30,
                                        "train.num_steps": 50, "log_every": 1,
                                        "ckpt_every": 1}), check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "non-finite" in last, result.stderr[-2000:]
    good = int(re.search(r"the last good checkpoint is step (\d+)", last).group(1))
    assert good >= 2
    state = restore_state(tmp_path)
    assert int(state.step) == good
    assert all(np.isfinite(x).all() for x in params_of(state))


@pytest.mark.slow
def test_init_from_another_run(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    run(main_args(source, **{"train.num_steps": 3}))
    # Learning rates too small to move float32 weights: step 1 keeps the loaded weights.
    # The target averages G's weights, the source did not: its EMA starts from G's weights.
    result = run(main_args(target, **{"init_from": str(source), "train.num_steps": 1,
                                      "train.lr_d": 1e-30, "train.lr_g": 1e-30,
                                      "train.ema_decay": 0.5}))
    assert f"Starting from the weights of {source}" in result.stdout
    a, b = restore_state(source), restore_state(target)
    assert int(b.step) == 1
    for x, y in zip(jax.tree.leaves((a.g.params, a.d.params)),
                    jax.tree.leaves((b.g.params, b.d.params)), strict=True):
        np.testing.assert_array_equal(x, y)

    mismatch = run(main_args(tmp_path / "other", **{"init_from": str(source),
                                                    "model.ngf": 16}), check=False)
    assert mismatch.returncode != 0
    assert "holds networks of another architecture" in mismatch.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_missing_init_from(tmp_path):
    result = run(main_args(tmp_path / "run", init_from=str(tmp_path / "nowhere")), check=False)
    assert result.returncode != 0
    assert "config.json does not exist" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_folder_run_with_workers_survives_a_bad_image(tmp_path):
    folder = random_image_folder(tmp_path / "images", 16, (48, 40, 3), ".jpg")
    (folder / "broken.jpg").write_bytes((folder / "00.jpg").read_bytes()[:100])
    overrides = {"dataset": f"folder:{folder}", "data.num_workers": 2, "train.batch_size": 4,
                 "train.num_steps": 5, "ckpt_every": 2, "data.prepared": "off"}
    result = run(main_args(tmp_path / "run", **overrides))
    assert "Done: 5 steps" in result.stdout
    warning = re.search(r"skipped \d+ unreadable image file\(s\) so far, e\.g\. (.*); they",
                        result.stderr)
    assert warning and warning.group(1) == str(folder / "broken.jpg"), result.stderr[-2000:]
    resumed = run(main_args(tmp_path / "run", **{**overrides, "train.num_steps": 7}))
    assert "Resumed from step 5" in resumed.stdout and "Done: 7 steps" in resumed.stdout


def test_truncate_metrics_drops_later_and_broken_lines(tmp_path):
    from dcgan_jax import reporting
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n{"step": 8, "loss')
    reporting.truncate_metrics(str(path), 4)
    assert path.read_text() == '{"step": 2}\n{"step": 4}\n'


@pytest.mark.slow
def test_intervals_in_epochs_a_rectangular_grid_and_the_leaky_slope(tmp_path):
    """40 images in batches of 8: 5 steps an epoch; grids every epoch, saves every two."""
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8)).save(
            folder / f"{i:02d}.png")
    result = run(main_args(tmp_path / "run", **{
        "dataset": f"folder:{folder}", "train.batch_size": 8, "train.num_steps": 0,
        "train.num_epochs": 3, "sample_every_epochs": 1, "ckpt_every_epochs": 2,
        "keep_checkpoints": 5, "sample_grid": "2x3", "model.leaky_slope": 0.3}))
    assert "Done: 15 steps" in result.stdout
    samples = sorted(os.listdir(tmp_path / "run" / "samples"))
    assert samples == ["real.png", "step_0000005.png", "step_0000010.png", "step_0000015.png"]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["10", "15"]
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_0000015.png"))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2)
    saved = checkpoints.read_run_config(str(tmp_path / "run"))
    assert saved.model.leaky_slope == 0.3 and saved.sample_grid == "2x3"
