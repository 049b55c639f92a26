"""Several hosts: a preemption notice to one of them, and FID evaluated on all of them.

Two processes on 127.0.0.1 with gloo collectives stand for two hosts of a pod.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from test_fid_training import eval_overrides
from test_main import PROGRESS, params_of, restore_state

from helpers import REPO, main_args, random_fid_weights, run, subprocess_env

pytestmark = pytest.mark.slow


def start_two_hosts(args: list[str]) -> list[subprocess.Popen]:
    port = portpicker.pick_unused_port()
    return [subprocess.Popen(
        [sys.executable, *args, "--num_processes=2", f"--process_id={i}",
         f"--coordinator_address=127.0.0.1:{port}"],
        cwd=REPO, env=subprocess_env(devices=2), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def test_sigterm_to_one_host_makes_both_save_and_they_resume_as_if_unbroken(tmp_path):
    common = {"data.cache_dir": tmp_path / "cache", "ckpt_every": 100000,
              "sample_every": 100000, "log_every": 5}
    procs = start_two_hosts(main_args(tmp_path / "run", **common,
                                      **{"train.num_steps": 100000}))
    deadline = time.time() + 240
    for line in procs[0].stdout:
        if PROGRESS.match(line) or time.time() > deadline:
            break
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice reaches one host
    out, _ = finish(procs)
    stopped = int(re.search(r"Stopped at step (\d+); checkpoint saved", out).group(1))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        str(stopped)]
    data = tmp_path / "run" / "checkpoints" / str(stopped) / "data"
    assert sorted(p.name for p in data.iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json"], "both hosts saved their position"

    end = stopped + 3
    resumed, _ = finish(start_two_hosts(main_args(tmp_path / "run", **common,
                                                  **{"train.num_steps": end})))
    assert f"Resumed from step {stopped}" in resumed and f"Done: {end} steps" in resumed
    finish(start_two_hosts(main_args(tmp_path / "unbroken", **common,
                                     **{"train.num_steps": end})))
    a, b = restore_state(tmp_path / "run", end), restore_state(tmp_path / "unbroken", end)
    for x, y in zip(params_of(a), params_of(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_fid_in_a_run_on_two_hosts_equals_one_host(tmp_path):
    weights = random_fid_weights(str(tmp_path / "weights.npz"))
    overrides = {**eval_overrides(tmp_path, weights), "train.num_steps": 2}
    out, second = finish(start_two_hosts(main_args(tmp_path / "run", **overrides)))
    fid = float(re.search(r"step 2 \| FID ([\d.]+) KID", out).group(1))
    assert "FID" not in second, "process 0 alone reports"
    cached = list((tmp_path / "cache" / "fid_stats").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz", cached

    # The same checkpoint scored by one process, reference statistics computed afresh.
    alone = tmp_path / "alone"
    shutil.copytree(tmp_path / "run", alone)
    config = json.loads((alone / "config.json").read_text())
    config["data"]["cache_dir"] = str(tmp_path / "cache_alone")
    (alone / "config.json").write_text(json.dumps(config))
    (alone / "run.lock").unlink(missing_ok=True)
    result = run(["-m", "dcgan_jax.evaluate", f"--workdir={alone}", "--step=2"], devices=4)
    assert "computed" in result.stdout or "cached" in result.stdout, result.stdout
    assert float(re.search(r"FID: ([\d.]+)", result.stdout).group(1)) == pytest.approx(
        fid, rel=1e-4)
