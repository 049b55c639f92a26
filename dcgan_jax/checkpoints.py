"""Orbax checkpoints of a run: both networks, optimizers, EMA, RNG, step and data position.

A checkpoint is written asynchronously into `WORKDIR/checkpoints/STEP` and becomes visible
only once complete, so a crash mid-save never damages the checkpoints already there.
"""

from __future__ import annotations

import errno
import math
import os
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dcgan_jax import config as config_lib
from dcgan_jax import parallel, paths, step as step_lib
from dcgan_jax import workdir as workdir_lib


class CheckpointError(ValueError):
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


# What a complete checkpoint folder holds besides the arrays (orbax writes them last).
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(paths.absolute(workdir), workdir_lib.CHECKPOINTS_DIR)


def _fid(metrics: dict[str, float]) -> float:
    """A checkpoint's FID; one saved without an evaluation ranks last."""
    return metrics.get("fid", math.inf)


def make_manager(workdir: str, keep: int = 3, read_only: bool = False,
                 keep_best_fid: bool = False) -> ocp.CheckpointManager:
    """Keeps the latest `keep` checkpoints and, with `keep_best_fid`, the one of the lowest
    FID too: a GAN's best weights can come long before its last ones."""
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if keep_best_fid else keep,
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            policies.BestN(get_metric_fn=_fid, reverse=True, n=1,
                           keep_checkpoints_without_metrics=False)]) if keep_best_fid else None,
        best_fn=_fid if keep_best_fid else None, best_mode="min",
        create=not read_only, read_only=read_only, enable_async_checkpointing=not read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: step_lib.GANState,
         data_position: Any = None, metrics: dict[str, float] | None = None) -> None:
    """Saves asynchronously; `data_position` is anything with grain's `get_state()` (the
    pipeline after this step's batch); `metrics` (an evaluation's FID) rank it among the
    best."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_position is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_position)
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


def best_fid(manager: ocp.CheckpointManager) -> tuple[int, float] | None:
    """(step, FID) of the best evaluated checkpoint kept, if any."""
    step = manager.best_step()
    fid = _fid(manager.metrics(step) or {}) if step is not None else math.inf
    return (step, fid) if math.isfinite(fid) else None


def restore(manager: ocp.CheckpointManager, abstract_state: step_lib.GANState,
            step: int | None = None, data_iterator: Any = None) -> step_lib.GANState:
    """The state at `step` (latest when None); also rewinds `data_iterator` when given."""
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {manager.directory}; train first")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {manager.directory}; "
                              f"saved steps: {', '.join(map(str, sorted(steps)))}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    path = os.path.join(manager.directory, str(step))
    missing = [name for name in REQUIRED_FILES if not paths.exists(os.path.join(path, name))]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: {', '.join(missing)} "
                              f"missing")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # orbax raises many types for unreadable files
        raise CheckpointError(f"checkpoint {path} cannot be read: {_cause(error)}") from None
    return restored["state"]


def restore_newest_readable(manager: ocp.CheckpointManager, abstract_state: Any,
                            data_iterator: Any, say: Callable[[str], None]
                            ) -> tuple[step_lib.GANState, int] | None:
    """The state of the newest checkpoint that can be read, and its step; None if none can.

    An unreadable one is reported in one line and moved aside into
    WORKDIR/checkpoints_unreadable/ (never deleted), and the one before it is tried.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return restore(manager, abstract_state, step, data_iterator), step
        except CheckpointError as error:
            aside = _move_aside(manager, step)
            say(f"Warning: {error}; moved it to {aside}, trying the checkpoint before it")
    return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    folder = os.path.join(os.path.dirname(str(manager.directory)), "checkpoints_unreadable")
    aside = os.path.join(folder, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
        paths.move(os.path.join(manager.directory, str(step)), aside)
    manager.reload()
    return aside


def read_run_config(workdir: str) -> Any:
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if not paths.is_file(path):
        raise CheckpointError(f"{path} does not exist; is {workdir!r} a dcgan_jax workdir?")
    return config_lib.from_json(paths.read_text(path))


def check_resumable(config: Any, workdir: str) -> None:
    """Refuses to resume with other networks, or with another data path or (when decoding
    every epoch) worker count than the saved data position was taken with."""
    saved = config_lib.flatten(read_run_config(workdir))
    position_fields = {"data.prepared"} | (
        {"data.num_workers"} if config.data.prepared == "off" else set())
    for name, value in config_lib.flatten(config).items():
        if not (name.startswith("model.") or name in position_fields):
            continue
        if (saved_value := saved.get(name)) != value:
            raise CheckpointError(
                f"config.{name}={value!r} differs from {saved_value!r} in "
                f"{os.path.join(workdir, 'config.json')}, whose checkpoints this run would "
                f"resume; keep the saved value, or start a new workdir (with "
                f"--config.init_from={workdir} to keep the weights)")


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
            a.shape != b.shape for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs))):
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
