"""Results do not depend on how many devices or hosts share the global batch."""

import json
import os
import re
import subprocess
import sys

import portpicker
import pytest

from helpers import REPO, main_args, run, subprocess_env

WORKER = os.path.join(REPO, "tests", "parallel_worker.py")
pytestmark = pytest.mark.slow  # every test starts processes


def result_of(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def assert_close(a: dict, b: dict, rel: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for key in ("loss_d", "loss_g", "d_real", "d_fake_before", "d_fake_after",
                "g_params_abs_sum", "penalty"):
        if key in a:
            assert a[key] == pytest.approx(b[key], rel=rel), key


# Every objective, penalty, D normalisation, augmentation and conditioning, a few at a time.
# The last three test how results split over devices, not what XLA's optimisations make of
# the step (the cases before them do): unoptimised, each compiles in half the time.
UNOPTIMISED = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
CASES = [
    pytest.param([], None, id="ns"),
    pytest.param(["--msg"], None, id="msg"),
    pytest.param(["--random_flip", "--loss=lsgan", "--d_norm=none"], None,
                 id="random_flip-lsgan-no_norm"),
    pytest.param(["--msg", "--loss=hinge", "--gradient_penalty=r1", "--d_norm=spectral",
                  "--augment=color,translation,cutout"], UNOPTIMISED,
                 id="msg-hinge-r1-spectral-augment"),
    pytest.param(["--loss=wgan", "--gradient_penalty=wgan_gp", "--d_norm=none",
                  "--augment=translation"], UNOPTIMISED, id="wgan-gp-translation"),
    pytest.param(["--msg", "--num_classes=10", "--g_cond=cbn", "--d_cond=projection"],
                 UNOPTIMISED, id="msg-cbn-projection"),
]


@pytest.mark.parametrize("flags,env", CASES)
def test_one_and_four_devices_agree(flags, env):
    one = result_of(run([WORKER, *flags], devices=1, env=env).stdout)
    four = result_of(run([WORKER, *flags], devices=4, env=env).stdout)
    assert one["devices"] == 1 and four["devices"] == 4
    assert_close(one, four)


def test_chunked_patch_forms_on_four_devices_agree_with_direct_forms():
    """The CPU's patch-matrix convolutions and kernel gradients, at every layer and one
    image per chunk, on a batch sharded over four devices, train as the direct forms do on
    one device."""
    direct = result_of(run([WORKER], devices=1).stdout)
    patches = result_of(run([WORKER, "--patch_forms"], devices=4).stdout)
    assert patches["loops"] > direct["loops"]
    assert_close(direct, patches)


def test_two_hosts_agree_with_one():
    """Process 1 stands for a host with another processor: without process 0's CPU forms
    its step would hold other collectives, and gloo would abort both."""
    single = result_of(run([WORKER], devices=4).stdout)
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(
        [sys.executable, WORKER, "--num_processes=2", f"--process_id={i}",
         f"--coordinator_address=127.0.0.1:{port}", *(["--other_processor"] if i else [])],
        cwd=REPO, env=subprocess_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    multi = result_of(outputs[0][0])
    assert multi["devices"] == 4
    forms = [re.search(r"^FORMS (.*)$", out, re.M).group(1) for out, _ in outputs]
    assert forms[0] == forms[1], "process 1 compiled process 0's forms"
    assert "process 1 runs process 0's CPU forms (kernel-gradient chunks of" in outputs[1][1]
    assert "CPU forms" not in outputs[0][1]
    assert_close(single, multi)


def run_two_hosts(args: list[str]) -> list[tuple[str, str]]:
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(
        [sys.executable, *args, "--num_processes=2", f"--process_id={i}",
         f"--coordinator_address=127.0.0.1:{port}"],
        cwd=REPO, env=subprocess_env(devices=2), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


def test_training_run_on_two_hosts_prepares_saves_and_resumes(tmp_path):
    """Each process prepares its own shard of the data, then both resume from it."""
    cache = tmp_path / "cache"
    (out, _), (out_1, _) = run_two_hosts(main_args(tmp_path / "run", **{
        "data.cache_dir": cache, "train.num_steps": 4, "ckpt_every": 4}))
    assert "over 2 process(es)" in out and "Done: 4 steps" in out
    for index, output in enumerate((out, out_1)):
        assert re.search(rf"process {index}: Preparing 2,500 records into .*shard{index}of2",
                         output), output[-2000:]
    assert sorted(p.name.split("-")[1] for p in (cache / "prepared").iterdir()) == [
        "32x1", "32x1"]
    data_states = sorted(os.listdir(tmp_path / "run" / "checkpoints" / "4" / "data"))
    assert data_states == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    positions = [json.loads((tmp_path / "run" / "checkpoints" / "4" / "data" /
                             f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert all(p["offset"] == 4 * 8 and p["rows"] == 2500 for p in positions)
    (resumed, _), (resumed_1, _) = run_two_hosts(main_args(tmp_path / "run", **{
        "data.cache_dir": cache, "train.num_steps": 6, "ckpt_every": 4}))
    assert "Resumed from step 4" in resumed and "Done: 6 steps" in resumed
    assert "Preparing" not in resumed + resumed_1, "the prepared shards are reused"
    assert "Config:" not in resumed_1 and "Done:" not in resumed_1, "only process 0 reports"
