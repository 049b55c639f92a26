"""A resume never starts over on a user's run: it refuses in one line and keeps every byte,
or resumes, naming what changed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from test_hardening import one_line_error

from dcgan_jax import checkpoints, data, resume
from dcgan_jax import workdir as workdir_lib

from helpers import REPO, main_args, random_image_folder, run, subprocess_env, tree_digest
from tiny_config import tiny_config

DATASET = {"dataset": "demo:mnist", "records": 5000, "fingerprint": "f"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A real checkpoint of step 6 of the tiny config, its data position over DATASET."""
    from dcgan_jax import parallel, prepared
    from dcgan_jax import step as step_lib
    folder = tmp_path_factory.mktemp("checkpoint")
    state = step_lib.create_train_state(tiny_config(), parallel.make_mesh(), 10)
    position = prepared.BatchIterator(np.zeros((40, 32, 32, 1), np.uint8), 16, seed=0)
    manager = checkpoints.make_manager(str(folder))
    checkpoints.save(manager, 6, state, position, dataset=DATASET)
    checkpoints.finish_saves(manager)
    return folder / "checkpoints"


@pytest.fixture
def saved_run(tmp_path, tiny_checkpoint):
    """A workdir as a run leaves it, with the files that must survive any refusal."""
    config = tiny_config()
    resume.write_run_config(str(tmp_path), config)
    shutil.copytree(tiny_checkpoint, tmp_path / "checkpoints")
    (tmp_path / "metrics.jsonl").write_text('{"step": 6}\n')
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step_0000006.png").write_bytes(b"png")
    return tmp_path, config


def test_plan_refuses_what_shapes_the_state_and_names_the_recipe_changes(saved_run):
    workdir, config = saved_run
    before = tree_digest(workdir)

    def plan(identity=DATASET, **overrides):
        changed = config.copy_and_resolve_references()
        for dotted, value in overrides.items():
            node = changed
            *parents, leaf = dotted.split(".")
            for name in parents:
                node = node[name]
            node[leaf] = value
        lines = []
        return resume.plan(changed, str(workdir), identity, False, lines.append), lines

    for overrides, refusal, init_from in [
            ({"model.ngf": 16}, "config.model.ngf=16 differs from 8 in", False),
            ({"train.ema_decay": 0.999}, "turns the average of G on (it was 0.0)", True),
            ({"model.d_norm": "spectral"}, "config.model.d_norm='spectral' differs", False),
            ({"model.leaky_slope": 0.1}, "config.model.leaky_slope=0.1 differs", True),
            ({"data.prepared": "off"}, "config.data.prepared='off' differs from 'auto'",
             True)]:
        with pytest.raises(checkpoints.IncompatibleCheckpointError) as error:
            plan(**overrides)
        assert refusal in str(error.value)
        assert ("--config.init_from=" in str(error.value)) == init_from, str(error.value)
    with pytest.raises(checkpoints.DataPositionError,
                       match=r"holds 5,001 records, 5,000 when the checkpoint was saved.*"
                             r"--config.data.reset_position=true"):
        plan({**DATASET, "records": 5001})
    with pytest.raises(checkpoints.DataPositionError, match="records of demo:mnist changed"):
        plan({**DATASET, "fingerprint": "g"})
    assert tree_digest(workdir) == before

    unchanged, lines = plan(**{"train.num_steps": 99, "eval.every": 5})
    assert unchanged == resume.Plan(resume=True) and lines == []
    moved, lines = plan({**DATASET, "dataset": "folder:/elsewhere"},
                        **{"dataset": "folder:/elsewhere"})  # the same records, moved
    assert moved.resume and not moved.reset_position
    assert lines == ["Changed since the checkpoints: dataset 'demo:mnist' -> "
                     "'folder:/elsewhere'"]
    recipe, lines = plan(**{"train.loss": "hinge", "train.augment": "color"})
    assert recipe.changes == {"train.loss": ("ns", "hinge"), "train.augment": ("", "color")}
    assert lines == ["Changed since the checkpoints: train.augment '' -> 'color', "
                     "train.loss 'ns' -> 'hinge'"]
    reset, lines = plan({**DATASET, "records": 5001}, **{"data.reset_position": True})
    assert reset.resume and reset.reset_position and "Restarting the data order" in lines[0]
    ema_rate, _ = plan(**{"train.ema_decay": 0.0})
    assert ema_rate.resume
    assert tree_digest(workdir) == before


def test_a_damaged_config_json_is_one_line(saved_run):
    workdir, config = saved_run
    path = workdir / workdir_lib.CONFIG_FILE
    path.write_text(path.read_text()[:100])
    with pytest.raises(checkpoints.CheckpointError, match=f"{path} is damaged \\(Unterminated"):
        resume.plan(config, str(workdir), DATASET, False, print)
    path.write_text("[1, 2]")
    with pytest.raises(checkpoints.CheckpointError, match=f"{path} is damaged"):
        checkpoints.read_run_config(str(workdir))


def test_a_fresh_start_sets_an_earlier_run_aside_byte_for_byte(saved_run):
    workdir, config = saved_run
    shutil.rmtree(workdir / "checkpoints")  # killed before its first checkpoint
    before = tree_digest(workdir)
    (workdir / "notes.txt").write_text("the user's own file")  # not a run's: stays
    lines = []
    assert resume.plan(config, str(workdir), DATASET, False, lines.append) == resume.Plan(False)
    (aside,) = os.listdir(workdir / workdir_lib.PREVIOUS_DIR)
    assert tree_digest(workdir / workdir_lib.PREVIOUS_DIR / aside) == before
    assert lines == [f"Set the earlier run's files aside into {workdir}/previous/{aside} "
                     f"(nothing in it to resume); starting afresh"]
    config.init_from = str(workdir)
    with pytest.raises(checkpoints.CheckpointError, match="is the workdir itself"):
        resume.plan(config, str(workdir), DATASET, True, lines.append)
    config.init_from = ""
    assert sorted(os.listdir(workdir)) == ["notes.txt", workdir_lib.PREVIOUS_DIR]
    assert resume.plan(config, str(workdir), DATASET, True, lines.append) == resume.Plan(False)
    assert len(lines) == 1  # nothing left to set aside


def test_source_identity_survives_a_copy_and_sees_a_new_or_changed_image(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f"{i}.png")
    def identity(path):
        found = data.open_source(f"folder:{path}").identity()
        return found["records"], found["fingerprint"]

    original = identity(folder)
    time.sleep(0.01)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copy)  # new times, same files
    assert identity(copy) == original
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(copy / "1.png")
    records, fingerprint = identity(copy)
    assert records == 3 and fingerprint != original[1]
    shutil.copy(copy / "0.png", copy / "3.png")
    assert identity(copy)[0] == 4


def _interrupted(args, signum, after: str | float):
    """Runs a command line and sends it `signum` after `after` seconds, or once a line
    starting with `after` is printed."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=subprocess_env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if isinstance(after, str):
        for line in proc.stdout:
            if line.startswith(after):
                break
    else:
        time.sleep(after)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.slow
def test_refused_resumes_and_stops_keep_every_byte_and_a_recipe_change_is_recorded(tmp_path):
    """One run (checkpoints 3 and 6), then each way a resume must stop in one line with
    the workdir untouched; then --start_over, an EMA switch the other way, and a recipe
    change, which resumes, says so and records it."""
    run(main_args(tmp_path))
    before = tree_digest(tmp_path)

    def refused(expected_status, *parts, **overrides):
        result = run(main_args(tmp_path, **{"train.num_steps": 9, **overrides}), check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == expected_status and len(lines) == 1, result.stderr[-3000:]
        for part in parts:
            assert part in lines[0], lines[0]
        assert tree_digest(tmp_path) == before
        return result

    ema_on = refused(1, "config.train.ema_decay=0.999 turns the average of G on",
                     **{"train.ema_decay": 0.999})
    assert ema_on.stdout == ""  # before the start-up tables
    refused(1, "config.model.ngf=16 differs from 8 in", "or train in a new workdir",
            **{"model.ngf": 16})

    # The second stops after the restore, before the first step: the changed recipe must
    # not reach config.json (the next resume would not name the change).
    for signum, after in ((signal.SIGINT, 0.5), (signal.SIGTERM, "Resumed from step 6")):
        stopped = _interrupted(main_args(tmp_path, **{"train.num_steps": 9,
                                                      "train.loss": "hinge"}), signum, after)
        one = stopped.stderr.strip().splitlines()
        assert stopped.returncode == 128 + signum and len(one) == 1, stopped.stderr[-3000:]
        assert f"stopped by {signal.Signals(signum).name}" in one[0]
        assert tree_digest(tmp_path) == before

    config_json = tmp_path / "config.json"
    saved = config_json.read_bytes()
    config_json.write_bytes(saved[:100])
    before = tree_digest(tmp_path)
    refused(1, f"{config_json} is damaged")
    config_json.write_bytes(saved)

    for data_file in (tmp_path / "checkpoints").glob("*/state/ocdbt.process_0/d/*"):
        data_file.write_bytes(data_file.read_bytes()[:10])
    before = tree_digest(tmp_path)
    one_line_error(refused(1), "none of the 2 checkpoints in", "can be read (step 6: ",
                          "nothing was moved", "--start_over")

    afresh = run(main_args(tmp_path, **{"train.ema_decay": 0.5}) + ["--start_over"])
    (aside,) = os.listdir(tmp_path / "previous")
    assert f"Set the earlier run's files aside into {tmp_path}/previous/{aside}" in afresh.stdout
    assert tree_digest(tmp_path / "previous" / aside) == before
    assert "Done: 6 steps" in afresh.stdout

    before = tree_digest(tmp_path)
    refused(1, "config.train.ema_decay=0.0 turns the average of G off (it was 0.5)",
            **{"train.ema_decay": 0.0})
    stale = tmp_path / "checkpoints" / f"7{checkpoints.TMP_SUFFIX}-1700000000"
    stale.mkdir()
    changed = run(main_args(tmp_path, **{"train.num_steps": 8, "train.ema_decay": 0.5,
                                         "train.loss": "hinge", "train.augment": "color"}))
    assert ("Changed since the checkpoints: train.augment '' -> 'color', "
            "train.loss 'ns' -> 'hinge'") in changed.stdout
    assert f"Removing {stale}, a save that a stopped run left unfinished" in changed.stdout
    assert not stale.exists() and "Resumed from step 6" in changed.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 6, 8]
    assert rows[3]["config_changes"] == {"train.loss": ["ns", "hinge"],
                                         "train.augment": ["", "color"]}
    assert checkpoints.read_run_config(str(tmp_path)).train.loss == "hinge"


@pytest.mark.slow
def test_a_folder_that_gained_an_image_refuses_then_restarts_its_data_order(tmp_path):
    folder = random_image_folder(tmp_path / "images", 40, (32, 32))
    workdir = tmp_path / "run"
    overrides = {"dataset": f"folder:{folder}", "data.cache_dir": str(tmp_path / "cache")}
    run(main_args(workdir, **overrides))
    before = tree_digest(workdir)
    shutil.copy(folder / "00.png", folder / "40.png")
    result = run(main_args(workdir, **{**overrides, "train.num_steps": 9}), check=False)
    one_line_error(result, f"cannot resume {workdir}: folder:{folder} holds 41 records, 40 "
                           f"when the checkpoint was saved",
                   "--config.data.reset_position=true")
    assert tree_digest(workdir) == before

    reset = run(main_args(workdir, **{**overrides, "train.num_steps": 9,
                                      "data.reset_position": True}))
    assert "Restarting the data order" in reset.stdout and "Resumed from step 6" in reset.stdout
    assert "Done: 9 steps" in reset.stdout
    assert checkpoints.saved_dataset(str(workdir), 9)["records"] == 41
    again = run(main_args(workdir, **{**overrides, "train.num_steps": 10}))
    assert "Restarting" not in again.stdout and "Resumed from step 9" in again.stdout


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's reads
def test_a_checkpoint_that_reads_but_does_not_fit_is_never_moved(tmp_path):
    """The tree and the data position are checked against the checkpoint itself too, for
    what the config check cannot see (an edited config.json, a workdir from before
    recorded datasets); an unreadable newer checkpoint falls back to an older one."""
    import jax

    from dcgan_jax import parallel, prepared
    from dcgan_jax import step as step_lib
    config = tiny_config()
    mesh = parallel.make_mesh()
    state = step_lib.create_train_state(config, mesh, 10)
    images = np.zeros((40, 32, 32, 1), np.uint8)
    saved_position = prepared.BatchIterator(images, 16, seed=0)
    next(saved_position)
    manager = checkpoints.make_manager(str(tmp_path))
    for step in (3, 6):
        checkpoints.save(manager, step, state, saved_position)
    checkpoints.finish_saves(manager)
    manager = checkpoints.make_manager(str(tmp_path), read_only=True)
    before = tree_digest(tmp_path)

    wider = step_lib.abstract_train_state(tiny_config(model__ngf=16), mesh, 10)
    with pytest.raises(checkpoints.IncompatibleCheckpointError,
                       match=r"checkpoints/6 does not fit the networks that .*config.json "
                             r"describes \(\d+ arrays differ, e.g. g/.* is \(.*\) there, "
                             r"\(.*\) here\): was config.json edited\?"):
        checkpoints.restore_newest_readable(manager, wider, None, print)
    with_ema = step_lib.abstract_train_state(tiny_config(train__ema_decay=0.5), mesh, 10)
    with pytest.raises(checkpoints.IncompatibleCheckpointError,
                       match="ema present on one side only"):
        checkpoints.restore_newest_readable(manager, with_ema, None, print)
    abstract = step_lib.abstract_train_state(config, mesh, 10)
    more_images = prepared.BatchIterator(np.zeros((41, 32, 32, 1), np.uint8), 16, seed=0)
    with pytest.raises(checkpoints.DataPositionError,
                       match="data position is for 40 prepared images, but there are 41"):
        checkpoints.restore_newest_readable(manager, abstract, more_images, print)
    lines = []
    _, step = checkpoints.restore_newest_readable(manager, abstract, more_images, lines.append,
                                                  reset_position=True)
    assert step == 6 and (more_images.epoch, more_images.offset) == (0, 0)
    assert lines[0].startswith("Restarting the data order (checkpoint ")
    assert tree_digest(tmp_path) == before

    for data_file in (tmp_path / "checkpoints" / "6").glob("state/ocdbt.process_0/d/*"):
        data_file.write_bytes(data_file.read_bytes()[:10])
    lines = []
    position = prepared.BatchIterator(images, 16, seed=0)
    restored, step = checkpoints.restore_newest_readable(manager, abstract, position,
                                                         lines.append)
    assert step == 3 and position.offset == 16
    assert int(jax.device_get(restored.step)) == int(jax.device_get(state.step))
    assert "checkpoints/6 cannot be read" in lines[0]
    assert lines[1].startswith("Moved the unreadable checkpoint of step 6 to ")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
