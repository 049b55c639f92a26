"""Several hosts: a preemption notice to one of them, and the metrics evaluated on all of them.

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

from helpers import REPO, main_args, run, subprocess_env, write_folder

pytestmark = pytest.mark.slow


def start_two_hosts(args: list[str]) -> list[subprocess.Popen]:
    port = portpicker.pick_unused_port()
    return [subprocess.Popen(
        [sys.executable, *args, "--num_processes=2", f"--process_id={i}",
         f"--coordinator_address=127.0.0.1:{port}"],
        cwd=REPO, env=subprocess_env(devices=2), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=600) for p in procs]
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


def own_samples_folder(tmp_path, overrides: dict, count: int = 40) -> str:
    """PNGs of what the run's G will draw at step 2, from other latents: learning rates of
    1e-12 leave G's weights as they start and its BatchNorm statistics depend on its latents
    alone, so one process's 2 steps on any data give the G the two hosts will evaluate. As
    a dataset, its metrics against that G are neither 0 nor 1."""
    import jax.numpy as jnp

    from dcgan_jax import checkpoints, images
    from dcgan_jax import step as step_lib
    workdir = tmp_path / "same_g"
    run(main_args(workdir, **{**overrides, "eval.every": 0}))
    state = restore_state(workdir, 2)
    config = checkpoints.read_run_config(str(workdir))
    z = step_lib.latent_sequence(1234, jnp.arange(count), config.model.nz)
    drawn = images.to_uint8(np.asarray(step_lib.generate_images(state, z, config)))
    return write_folder(tmp_path / "data", drawn[..., 0])


def test_every_metric_in_a_run_on_two_hosts_equals_one_host(tmp_path, torch_weights):
    """The in-run evaluator on two hosts (each embeds its share of the samples and of the
    reference) logs every metric as one process's `evaluate` of the same checkpoint computes
    it; tests/test_metrics_reference.py ties `evaluate` to the reference implementations."""
    weights = torch_weights[1]["zip"]
    # 2048-d features, which the Inception Score needs: few images, as each costs ~0.2 s.
    overrides = {**eval_overrides(tmp_path, weights), "train.num_steps": 2,
                 "train.lr_g": 1e-12, "train.lr_d": 1e-12,
                 "eval.metrics": "fid,kid,is,pr,dc,mem", "eval.dims": 2048,
                 "eval.num_samples": 20, "eval.num_reference": 40,
                 "eval.kid_subset_size": 16, "eval.batch_size": 10}
    overrides["dataset"] = f"folder:{own_samples_folder(tmp_path, overrides)}"
    out, second = finish(start_two_hosts(main_args(tmp_path / "run", **overrides)))
    assert re.search(r"step 2 \| FID [\d.]+ KID .* IS .* precision .* memorisation", out), out
    assert "FID" not in second, "process 0 alone reports"
    cached = list((tmp_path / "cache" / "fid_stats").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz", cached
    logged = next(row for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                     .read_text().splitlines()) if "fid" in row)

    # The same checkpoint scored by one process, reference statistics computed afresh.
    alone = tmp_path / "alone"
    shutil.copytree(tmp_path / "run", alone)
    config = json.loads((alone / "config.json").read_text())
    config["data"]["cache_dir"] = str(tmp_path / "cache_alone")
    (alone / "config.json").write_text(json.dumps(config))
    (alone / "run.lock").unlink(missing_ok=True)
    result = run(["-m", "dcgan_jax.evaluate", f"--workdir={alone}", "--step=2"], devices=4)
    assert "computed" in result.stdout, result.stdout
    printed = {}
    for label, name in (("FID", "fid"), ("KID", "kid"), ("IS", "is"), ("precision", "precision"),
                        ("recall", "recall"), ("density", "density"),
                        ("coverage", "coverage"), ("memorisation", "memorisation")):
        found = re.search(rf"^{label}: ([-\d.]+)(?: ± ([\d.]+))?", result.stdout, re.M)
        printed[name] = float(found.group(1))
        if found.group(2) is not None:
            printed[f"{name}_std"] = float(found.group(2))
    assert set(printed) <= set(logged)
    for name in ("precision", "recall", "coverage", "memorisation"):
        assert 0 < printed[name] < 1, (name, printed)
    assert printed["is"] > 1.0001 and printed["fid"] > 0 and printed["kid_std"] > 0, printed
    for name, value in printed.items():  # evaluate prints 6 decimals
        assert value == pytest.approx(logged[name], rel=1e-4, abs=2e-6), name
