"""Orbax checkpoints of a run: both networks, optimizers, EMA, RNG, step and data position.

A checkpoint is written asynchronously into `WORKDIR/checkpoints/STEP` and becomes visible
only once complete, so a crash mid-save never damages the checkpoints already there.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dcgan_jax import config as config_lib
from dcgan_jax import parallel, paths, prepared
from dcgan_jax import step as step_lib
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.errors import UserFacingError
from dcgan_jax.names import HIGHER_IS_BETTER


class CheckpointError(UserFacingError, ValueError):
    """A checkpoint that was asked for is missing, cannot be read or cannot be written."""


def _cause(error: BaseException) -> str:
    """The reason of an orbax or tensorstore failure in a few words: the innermost error's
    first line (orbax wraps tensorstore's, and appends pages of its spec)."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    text = str(error).strip()
    if "No space left on device" in text or getattr(error, "errno", None) == errno.ENOSPC:
        return "the disk is full"
    if "Permission denied" in text or isinstance(error, PermissionError):
        return "permission denied"
    first = text.splitlines()[0] if text else type(error).__name__
    return first.split(" See full TensorStore details")[0][:300]


# How orbax names the folder of a save until it is complete.
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# What a complete checkpoint folder holds besides the arrays (orbax writes them last).
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(paths.absolute(workdir), workdir_lib.CHECKPOINTS_DIR)


def ranking(metric: str) -> Callable[[dict[str, float]], float]:
    """A checkpoint's value of `metric`, signed so that lower is better (orbax keeps the
    lowest); one saved without an evaluation ranks last."""
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    return lambda metrics: sign * metrics.get(metric, sign * math.inf)


def make_manager(workdir: str, keep: int = 3, read_only: bool = False,
                 keep_best: str | None = None) -> ocp.CheckpointManager:
    """Keeps the latest `keep` checkpoints and, with `keep_best` (a metric's name, e.g.
    fid), the one of its best value too: a GAN's best weights can come long before its last
    ones."""
    policies = ocp.checkpoint_managers
    rank = ranking(keep_best) if keep_best else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if keep_best else keep,
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            policies.BestN(get_metric_fn=rank, reverse=True, n=1,
                           keep_checkpoints_without_metrics=False)]) if keep_best else None,
        best_fn=rank, best_mode="min",
        create=not read_only, read_only=read_only, enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: step_lib.GANState,
         data_position: Any = None, metrics: dict[str, float] | None = None,
         dataset: dict[str, Any] | None = None) -> None:
    """Saves asynchronously; `data_position` is anything with grain's `get_state()` (the
    pipeline after this step's batch), saved with `dataset`, the identity of the records
    it is over (`data.Source.identity`); `metrics` (an evaluation's FID) rank it among the
    best."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_position is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_position)
    if dataset is not None:
        items["dataset"] = ocp.args.JsonSave(dataset)
    check_saves(manager)
    try:
        manager.save(step, args=ocp.args.Composite(**items), metrics=metrics or {}, force=True)
    except Exception as error:  # orbax and tensorstore raise many types
        raise _save_failed(manager, error) from None


def _save_failed(manager: ocp.CheckpointManager, error: BaseException) -> CheckpointError:
    """A save, maybe an earlier one finishing in the background, failed: one line."""
    newest = manager.latest_step()
    kept = (f"the checkpoints saved before are kept, the newest is step {newest}"
            if newest is not None else "no checkpoint was saved before")
    return CheckpointError(f"saving a checkpoint in {manager.directory} failed: "
                           f"{_cause(error)}; {kept}")


def check_saves(manager: ocp.CheckpointManager) -> None:
    """Raises CheckpointError if a save running in the background has failed."""
    try:
        manager.check_for_errors()
    except Exception as error:
        raise _save_failed(manager, error) from None


def finish_saves(manager: ocp.CheckpointManager) -> None:
    """Waits for background saves; raises CheckpointError if one failed."""
    try:
        manager.wait_until_finished()
    except Exception as error:
        raise _save_failed(manager, error) from None


def best_score(manager: ocp.CheckpointManager, metric: str) -> tuple[int, float] | None:
    """(step, value of `metric`) of the best evaluated checkpoint kept, if any."""
    step = manager.best_step()
    value = (manager.metrics(step) or {}).get(metric, math.inf) if step is not None else math.inf
    return (step, value) if math.isfinite(value) else None


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint that reads but does not fit this run: never moved aside, never retried
    with an older one; the run stops, naming what differs."""


def saved_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in the workdir, as orbax judges them (in a
    bucket, a step folder is complete once it holds its commit marker). No manager is
    opened: that is a collective of every host, and some callers are process 0 alone."""
    if not paths.exists(checkpoint_dir(workdir)):
        return []
    return sorted(ocp.path.step.checkpoint_steps(checkpoint_dir(workdir)))


def stale_temporaries(workdir: str) -> list[str]:
    """Folders of saves that never finished (a killed run): orbax removes them when a
    writing manager opens, which only the run holding the workdir's lock does."""
    folder = checkpoint_dir(workdir)
    if not paths.exists(folder):
        return []
    complete = {str(step) for step in saved_steps(workdir)}
    return [os.path.join(folder, name) for name in paths.list_names(folder)
            if TMP_SUFFIX in name or (name.isdigit() and name not in complete)]


# Where orbax's JSON handler keeps the item `dataset` of a checkpoint, and a bound on it.
DATASET_FILE = os.path.join("dataset", "metadata")
MAX_DATASET_BYTES = 1 << 24  # thousands of class names fit


def saved_dataset(workdir: str, step: int) -> dict[str, Any] | None:
    """The identity of the records the data position of checkpoint `step` is over; None
    for checkpoints saved before it was recorded, or if it cannot be read (the restore of
    the position then judges). Read as a file: no manager, no collective."""
    path = os.path.join(checkpoint_dir(workdir), str(step), DATASET_FILE)
    try:
        if not paths.is_file(path) or paths.signature(path)[0] > MAX_DATASET_BYTES:
            return None
        record = json.loads(paths.read_text(path))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def class_names(workdir: str, step: int, num_classes: int) -> tuple[str, ...]:
    """The names of a conditional run's classes, as checkpoint `step` recorded them; their
    indices for checkpoints saved before the record held names."""
    names = (saved_dataset(workdir, step) or {}).get("classes")
    if isinstance(names, list) and len(names) == num_classes:
        return tuple(str(name) for name in names)
    return tuple(str(label) for label in range(num_classes))


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'g/params/Dense_0/kernel' -> shape, for a state, its abstract form or its metadata."""
    def name(key: Any) -> str:
        return str(getattr(key, "name", getattr(key, "key", getattr(key, "idx", key))))
    return {"/".join(map(name, path)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_fits(path: str, abstract_state: step_lib.GANState) -> None:
    """Raises IncompatibleCheckpointError if the checkpoint's arrays, read from its
    metadata, differ from the state its run's config.json builds; CheckpointError if the
    metadata cannot be read."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        saved = _leaf_shapes(checkpointer.metadata(os.path.join(path, "state")).item_metadata)
    except Exception as error:  # orbax raises many types for unreadable metadata
        raise CheckpointError(f"checkpoint {path} cannot be read: {_cause(error)}") from None
    finally:
        checkpointer.close()
    if not saved:
        raise CheckpointError(f"checkpoint {path} cannot be read: its metadata lists no "
                              f"arrays")
    wanted = _leaf_shapes(abstract_state)
    if saved == wanted:
        return
    differences = [f"{name} is {'missing' if name not in saved else saved[name]} there, "
                   f"{'missing' if name not in wanted else wanted[name]} here"
                   for name in sorted(set(saved) | set(wanted))
                   if saved.get(name) != wanted.get(name)]
    sections = sorted({name.split("/")[0] for name in set(saved) ^ set(wanted)})
    config_path = os.path.join(os.path.dirname(os.path.dirname(path)),
                               workdir_lib.CONFIG_FILE)
    raise IncompatibleCheckpointError(
        f"checkpoint {path} does not fit the networks that {config_path} describes "
        f"({len(differences)} arrays differ, e.g. {differences[0]}"
        + (f"; {', '.join(sections)} present on one side only" if sections else "")
        + f"): was {workdir_lib.CONFIG_FILE} edited? Restore the one the run was trained "
          f"with")


def restore(manager: ocp.CheckpointManager, abstract_state: step_lib.GANState,
            step: int | None = None) -> step_lib.GANState:
    """The state at `step` (latest when None).

    Raises IncompatibleCheckpointError if it does not fit `abstract_state`, and
    CheckpointError if it is missing or cannot be read.
    """
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {manager.directory}; train first")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {manager.directory}; "
                              f"saved steps: {', '.join(map(str, sorted(steps)))}")
    path = os.path.join(manager.directory, str(step))
    missing = [name for name in REQUIRED_FILES if not paths.exists(os.path.join(path, name))]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: {', '.join(missing)} "
                              f"missing")
    _check_fits(path, abstract_state)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    except Exception as error:  # orbax raises many types for unreadable files
        raise CheckpointError(f"checkpoint {path} cannot be read: {_cause(error)}") from None
    return restored["state"]


class DataPositionError(IncompatibleCheckpointError):
    """A checkpoint's data position does not fit the dataset as it is now."""


def position_advice(workdir: str) -> str:
    """The ways out of a data position that does not fit, in one sentence."""
    return (f"Go back to the data the run was trained on, restart the data order keeping "
            f"the step and the weights with --config.data.reset_position=true, or train in "
            f"a new workdir (with --config.init_from={workdir} to start from its weights)")


def restore_position(manager: ocp.CheckpointManager, step: int, data_iterator: Any) -> None:
    """Rewinds `data_iterator` to the position saved with `step`.

    Raises DataPositionError if the position does not fit the data (prepared data's
    iterator says so), CheckpointError if it cannot be read.
    """
    path = os.path.join(manager.directory, str(step))
    try:
        manager.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as error:
        cause = error
        while cause is not None and not isinstance(cause, prepared.PreparedDataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            reason = _cause(cause).split("; train in a new workdir")[0]
            raise DataPositionError(f"checkpoint {path}: {reason}") from None
        raise CheckpointError(f"checkpoint {path} cannot be read: {_cause(error)}") from None


def restore_newest_readable(manager: ocp.CheckpointManager, abstract_state: Any,
                            data_iterator: Any, say: Callable[[str], None],
                            reset_position: bool = False) -> tuple[step_lib.GANState, int]:
    """The state of the newest checkpoint that can be read, and its step; rewinds
    `data_iterator` (unless None) to its data position, or, with `reset_position`, leaves
    it at the start when that position does not fit the data.

    Unreadable ones (truncated files, missing metadata) are named in one line each and,
    once an older one has been restored, moved aside into WORKDIR/checkpoints_unreadable/
    (never deleted). A checkpoint that reads but does not fit (IncompatibleCheckpointError)
    stops the search, and so does finding none readable (CheckpointError): then nothing
    is moved.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {manager.directory}")
    unreadable: list[tuple[int, CheckpointError]] = []
    for index, step in enumerate(steps):
        try:
            state = restore(manager, abstract_state, step)
            if data_iterator is not None:
                restore_position(manager, step, data_iterator)
        except DataPositionError as error:
            if not reset_position:
                workdir = os.path.dirname(str(manager.directory))
                raise DataPositionError(f"{error}. {position_advice(workdir)}") from None
            say(f"Restarting the data order ({error}; data.reset_position=true), keeping "
                f"the step and the weights")
        except IncompatibleCheckpointError:
            raise
        except CheckpointError as error:
            later = "; trying the checkpoint before it" if index + 1 < len(steps) else ""
            say(f"Warning: {error}{later}")
            unreadable.append((step, error))
            continue
        for bad_step, _ in unreadable:
            say(f"Moved the unreadable checkpoint of step {bad_step} to "
                f"{_move_aside(manager, bad_step)}")
        return state, step
    newest_step, newest_error = unreadable[0]
    raise CheckpointError(
        f"none of the {len(steps)} checkpoints in {manager.directory} can be read (step "
        f"{newest_step}: {str(newest_error).split(': ', 1)[-1]}); nothing was moved or "
        f"changed. Restore them from a copy, train in a new workdir, or run again with "
        f"--start_over to set this run aside and start afresh")


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    folder = os.path.join(os.path.dirname(str(manager.directory)), workdir_lib.UNREADABLE_DIR)
    aside = os.path.join(folder, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
        paths.move(os.path.join(manager.directory, str(step)), aside)
    manager.reload()
    return aside


def read_run_config(workdir: str) -> Any:
    """The config a run saved in its workdir; CheckpointError in one line if it is missing
    or damaged."""
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if not paths.is_file(path):
        raise CheckpointError(f"{path} does not exist; is {workdir!r} a dcgan_jax workdir?")
    try:
        return config_lib.from_json(paths.read_text(path))
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{path} is damaged ({reason}); it records the config of the run in "
            f"{workdir}: restore it from a copy, or write it again from the config file "
            f"the run was started with") from None


def load_weights(workdir: str, state: step_lib.GANState, mesh: Any) -> step_lib.GANState:
    """`state` with G, D and EMA weights from another run's latest checkpoint.

    The optimizers, RNG and step stay fresh: the run starts anew from those weights.
    """
    try:
        other_config = read_run_config(workdir)
        abstract = step_lib.abstract_train_state(other_config, mesh, total_steps=1)
        other = restore(make_manager(workdir, read_only=True), abstract)
    except CheckpointError as error:
        raise CheckpointError(f"config.init_from={workdir!r}: {error}") from None
    # Statistics too: spectral normalisation keeps its power iteration there.
    mine = (state.g.params, state.d.params, state.g.batch_stats, state.d.batch_stats)
    theirs = (other.g.params, other.d.params, other.g.batch_stats, other.d.batch_stats)
    if jax.tree.structure(mine) != jax.tree.structure(theirs) or any(
            a.shape != b.shape
            for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs), strict=True)):
        raise CheckpointError(f"config.init_from={workdir!r} holds networks of another "
                              f"architecture; match its config.model fields")
    ema = state.ema
    if ema is not None:
        ema = other.ema or {"params": other.g.params, "batch_stats": other.g.batch_stats}
        ema = jax.tree.map(jnp.copy, ema)  # own buffers: the train step donates the state
    return state.replace(
        g=state.g.replace(params=other.g.params, batch_stats=other.g.batch_stats),
        d=state.d.replace(params=other.d.params, batch_stats=other.d.batch_stats),
        ema=jax.device_put(ema, parallel.replicated(mesh)))
