"""What a user meets when something is wrong: one line, no traceback, nothing saved lost."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from test_main import PROGRESS, restore_state

from dcgan_jax import checkpoints, parallel
from dcgan_jax import step as step_lib
from dcgan_jax import workdir as workdir_lib

from helpers import REPO, main_args, run, subprocess_env

pytestmark = pytest.mark.slow  # every test runs command lines as processes


def one_line_error(result, *parts):
    """The command failed with status 1 and one stderr line holding every part."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("text,expected", [
    ("def get_config(:\n", "(line 1): SyntaxError: invalid syntax"),
    ("def get_config():\n    return undefined_name\n",
     "(line 2): NameError: name 'undefined_name' is not defined"),
    ("x = 1\n", "defines no get_config()"),
    ("import no_such_module_here\n", "ModuleNotFoundError: No module named"),
])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, text, expected):
    config = tmp_path / "config.py"
    config.write_text(text)
    result = run(["-m", "dcgan_jax.main", f"--config={config}", f"--workdir={tmp_path / 'w'}"],
                 check=False)
    one_line_error(result, "dcgan_jax: error: ", str(config), expected)
    assert not (tmp_path / "w").exists()


def test_workdir_that_is_a_file_or_not_writable(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    one_line_error(run(main_args(a_file), check=False), f"--workdir={a_file} is a file")

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if os.geteuid() == 0:  # root writes through permissions, not to a read-only mount
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", readonly],
                          capture_output=True).returncode != 0:
            pytest.skip("as root, an unwritable folder needs a read-only mount")
    else:
        readonly.chmod(0o555)
    try:
        one_line_error(run(main_args(readonly), check=False),
                       f"--workdir={readonly} cannot be written by this user")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", readonly], check=True)


def test_a_second_run_on_a_workdir_stops_at_once_and_a_stale_lock_does_not(tmp_path):
    with workdir_lib.locked(str(tmp_path)):
        start = time.perf_counter()
        result = run(main_args(tmp_path), check=False)
        seconds = time.perf_counter() - start
    line = one_line_error(result, f"--workdir={tmp_path} is in use by another run",
                          f"process {os.getpid()} on host ")
    assert seconds < 60, f"refused only after {seconds:.0f} s: {line}"
    assert not (tmp_path / "checkpoints").exists()

    # A run killed with the lock held leaves the file, naming it, but blocks nothing.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dcgan_jax import workdir\n"
         "with workdir.locked(sys.argv[1]):\n    print('locked', flush=True)\n"
         "    time.sleep(300)", str(tmp_path)],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert str(holder.pid) in (tmp_path / workdir_lib.LOCK_FILE).read_text()
    done = run(main_args(tmp_path, **{"train.num_steps": 2}))
    assert "Done: 2 steps" in done.stdout


def test_a_second_stop_signal_stops_at_once_quietly_with_its_status(tmp_path):
    """The second of two stop signals exits at once, in one line, with 128 + its number.

    A second SIGTERM sent after the first was handled may arrive after the run has saved and
    exited, and one sent before merges with the first (the kernel keeps one pending signal
    of a kind); so the two are SIGINT then SIGTERM, which the same handler takes in turn.
    """
    args = main_args(tmp_path, **{"train.num_steps": 100000, "ckpt_every": 100000,
                                  "sample_every": 100000})
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    for line in proc.stdout:
        if PROGRESS.match(line) or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "Received SIGINT: saving a checkpoint" in out
    assert ("Received SIGTERM while stopping: stopping now without saving (exit status 143)"
            in out)
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_a_second_stop_signal_handled_inside_a_gc_callback_still_stops():
    """Python runs a signal's handler at its next check, which may fall inside a garbage
    collector's callback, where a raised exception is printed and ignored: the second
    signal must end the process there too, with its status and nothing after it."""
    script = """if True:
        import gc, os, signal
        from dcgan_jax import signals
        requested = signals.stop_requests()
        os.kill(os.getpid(), signal.SIGINT)
        assert requested.wait(10)

        def second_signal_during_collection(phase, info):
            if phase == "start":
                gc.callbacks.remove(second_signal_during_collection)
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(100000))

        gc.callbacks.append(second_signal_during_collection)
        gc.collect()
        print("still running")
    """
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stdout + result.stderr[-3000:]
    assert "stopping now without saving (exit status 143)" in result.stdout
    assert "still running" not in result.stdout
    assert "Exception ignored" not in result.stderr, result.stderr[-3000:]


@pytest.fixture
def small_disk():
    """A 600 kB tmpfs: room for the run's first checkpoint, not for many."""
    mount = tempfile.mkdtemp()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", mount],
                      capture_output=True).returncode != 0:
        os.rmdir(mount)
        pytest.skip("mounting a tmpfs needs root and a mount namespace")
    yield mount
    subprocess.run(["umount", mount], check=True)
    os.rmdir(mount)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_saved(small_disk):
    workdir = os.path.join(small_disk, "run")
    result = run(main_args(workdir, **{"train.num_steps": 30, "ckpt_every": 1,
                                       "keep_checkpoints": 30}), check=False)
    line = one_line_error(result, f"saving a checkpoint in {workdir}/checkpoints failed: "
                                  f"the disk is full; the checkpoints saved before are kept")
    newest = int(line.rsplit("the newest is step ", 1)[1])
    assert int(restore_state(workdir, newest).step) == newest


def test_an_unreadable_latest_checkpoint_is_moved_aside_and_the_one_before_resumed(tmp_path):
    run(main_args(tmp_path))  # checkpoints 3 and 6
    data_files = tmp_path / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d"
    for path in data_files.iterdir():
        path.write_bytes(path.read_bytes()[:10])
    result = run(main_args(tmp_path, **{"train.num_steps": 8}))
    warning = next(line for line in result.stdout.splitlines() if line.startswith("Warning:"))
    assert f"checkpoint {tmp_path}/checkpoints/6 cannot be read: OUT_OF_RANGE" in warning
    assert "<bound method" not in warning and "trying the checkpoint before it" in warning
    assert (f"Moved the unreadable checkpoint of step 6 to {tmp_path}/checkpoints_unreadable/6-"
            in result.stdout)
    assert "Resumed from step 3" in result.stdout and "Done: 8 steps" in result.stdout
    aside = os.listdir(tmp_path / "checkpoints_unreadable")
    assert len(aside) == 1 and aside[0].startswith("6-")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6", "8"]
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr

    # A checkpoint without its metadata names what is missing.
    os.remove(tmp_path / "checkpoints" / "8" / "state" / "_METADATA")
    config = checkpoints.read_run_config(str(tmp_path))
    manager = checkpoints.make_manager(str(tmp_path), read_only=True)
    abstract = step_lib.abstract_train_state(config, parallel.make_mesh(), 1)
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoints/8 is incomplete: "
                                                          r"state/_METADATA missing"):
        checkpoints.restore(manager, abstract, 8)


def test_no_library_noise_and_absolute_paths_from_a_relative_workdir(tmp_path):
    """A CPU run prints nothing on stderr (no TensorFlow, XLA or orbax notices), and its
    last line names folders a user can paste from anywhere."""
    config = os.path.join(REPO, "tests", "tiny_config.py")
    result = subprocess.run(
        [sys.executable, "-m", "dcgan_jax.main", f"--config={config}", "--workdir=rel",
         "--config.train.num_steps=2"], cwd=tmp_path, env=subprocess_env(),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    last = result.stdout.strip().splitlines()[-1]
    assert last == (f"Done: 2 steps. Samples in {tmp_path}/rel/samples, checkpoints in "
                    f"{tmp_path}/rel/checkpoints")
    summary = run(["-m", "dcgan_jax.sample", "summary", f"--workdir={tmp_path / 'rel'}"])
    assert summary.stderr == "" and "Generator:" in summary.stdout
