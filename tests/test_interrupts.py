"""Ctrl-C and SIGTERM while `dcgan_jax.prepare` starts its decoding workers: one line, the
status of the signal, no traceback from any process, no folder left aside, no process left.

A terminal's Ctrl-C reaches the whole process group, the workers too; so do SIGTERMs from
`timeout`, systemd or Slurm. A worker hit before it ignores SIGINT would print its traceback,
and one killed before it read its task would leave the thread that started it blocked."""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, subprocess_env


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Enough small images that decoding outlasts the workers' start: five chunks."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(1200):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(root / f"{i:04d}.png")
    return root


def live_processes_of_session(session: int) -> list[str]:
    """The processes of a session that are not zombies, as 'PID STATE'."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(f"{stat.split('/')[2]} {fields[0]}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_to_the_group_while_workers_start(image_folder, tmp_path, signum):
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcgan_jax.prepare", "--config=tests/tiny_config.py",
         "--workers=2", f"--config.dataset=folder:{image_folder}",
         f"--config.data.cache_dir={cache}"],
        cwd=REPO, env=subprocess_env(), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True)
    first = proc.stdout.readline()
    assert first.startswith("Preparing 1,200 records"), first + proc.communicate()[1]
    time.sleep(0.5)  # the workers are starting: they take seconds
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    status = 128 + signum
    assert proc.returncode == status, out + err
    assert err.splitlines() == [f"dcgan_jax.prepare: stopped by {signum.name} (exit status "
                                f"{status}); files already saved are kept"], err
    assert os.listdir(cache / "prepared") == []
    deadline = time.time() + 30
    while (left := live_processes_of_session(proc.pid)) and time.time() < deadline:
        time.sleep(0.2)
    assert not left
