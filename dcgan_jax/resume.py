"""Whether a run continues its workdir's checkpoints, refuses in one line, or starts afresh.

Decided before the start-up tables and before anything in the workdir is touched:
- config fields that change the networks' trees or what the saved state means (model.*,
  EMA on or off) must equal the saved ones;
- a conditional model's classes must be those its checkpoints were trained on;
- the data position saved with the newest checkpoint must fit the data: the same records
  (their identity is saved beside the position), the same `data.prepared` and, decoding
  every epoch, the same `data.num_workers`; `data.reset_position=true` restarts the data
  order instead;
- other changed fields (the recipe: loss, augment, rates, ...) are named in one line and
  recorded in metrics.jsonl;
- an earlier run's files are never overwritten: a fresh start sets them aside first.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from dcgan_jax import checkpoints, paths, signals
from dcgan_jax import config as config_lib
from dcgan_jax import workdir as workdir_lib

# Fields that neither shape the state nor change the training math: changed silently.
RUN_SETTINGS = ("train.num_steps", "train.num_epochs", "init_from", "log_every",
                "sample_every", "sample_every_epochs", "ckpt_every", "ckpt_every_epochs",
                "keep_checkpoints", "sample_grid", "data.prefetch", "data.cache_dir",
                "data.tfds_data_dir", "data.reset_position", "data.num_workers")
RUN_SETTING_PREFIXES = ("eval.",)
# model.* fields that leave every array's shape as it is: another value is refused on a
# resume, but --config.init_from can carry the weights over.
SHAPE_KEEPING_MODEL_FIELDS = ("model.leaky_slope",)
# How G and D take a class: nothing of an unconditional model.
CONDITIONING_FIELDS = ("model.g_cond", "model.d_cond")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the run does with the workdir: `resume` its checkpoints (restoring the data
    position unless `reset_position`), with the recipe `changes` {field: (old, new)}."""

    resume: bool
    changes: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    reset_position: bool = False


def write_run_config(workdir: str, config: Any) -> None:
    """config.json of the run that has just taken over the workdir (process 0 only)."""
    paths.write_text(os.path.join(workdir, workdir_lib.CONFIG_FILE),
                     config_lib.to_json(config))


def _is_run_setting(name: str) -> bool:
    return name in RUN_SETTINGS or name.startswith(RUN_SETTING_PREFIXES)


def _data_change(saved: dict[str, Any] | None, dataset: dict[str, Any]) -> str | None:
    """How the records differ from those of the saved data position, in a few words; None
    if they do not, or if the checkpoint does not say."""
    if saved is None or (saved.get("records"), saved.get("fingerprint")) == (
            dataset["records"], dataset["fingerprint"]):
        return None
    if saved.get("records") != dataset["records"]:
        return (f"{dataset['dataset']} holds {dataset['records']:,} records, "
                f"{saved.get('records'):,} when the checkpoint was saved")
    return f"the records of {dataset['dataset']} changed since the checkpoint was saved"


def _class_list(names: Any, shown: int = 5) -> str:
    names = list(names or [])
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return "[" + ", ".join(map(str, names[:shown])) + more + "]"


def _check_classes(config: Any, workdir: str, saved: dict[str, Any] | None,
                   dataset: dict[str, Any]) -> None:
    """A conditional model's labels mean the classes it was trained on: other classes (even
    as many, or renamed) are refused, whatever data.reset_position says."""
    if not config.model.num_classes or saved is None or "classes" not in saved:
        return
    if saved["classes"] != dataset.get("classes"):
        raise checkpoints.IncompatibleCheckpointError(
            f"cannot resume {workdir}: config.dataset={config.dataset!r} has the classes "
            f"{_class_list(dataset.get('classes'))}, and its checkpoints were trained on "
            f"{_class_list(saved['classes'])}; a conditional G draws its labels' classes, so "
            f"use the same classes or train in a new workdir")


def _is_on(ema_decay: Any) -> bool:
    return isinstance(ema_decay, (int, float)) and ema_decay > 0


def _check_init_from(config: Any, workdir: str) -> None:
    """Checks config.init_from before a fresh start moves anything: it must be a run with
    checkpoints, and not the workdir itself, whose files a fresh start moves."""
    if not config.init_from:
        return
    if paths.absolute(config.init_from) == paths.absolute(workdir):
        raise checkpoints.CheckpointError(
            f"config.init_from={config.init_from!r} is the workdir itself, whose files "
            f"--start_over moves into {workdir_lib.PREVIOUS_DIR}/: move the run elsewhere "
            f"first and start from there, or train in a new workdir")
    checkpoints.read_run_config(config.init_from)
    if not checkpoints.saved_steps(config.init_from):
        raise checkpoints.CheckpointError(
            f"config.init_from={config.init_from!r} holds no complete checkpoint")


def plan(config: Any, workdir: str, dataset: dict[str, Any], start_over: bool,
         say: Callable[[str], None], is_writer: bool = True) -> Plan:
    """Decides what the run does with `workdir` (see the module's docstring); raises
    CheckpointError in one line where it must not go on. Every process of a run decides
    alike; only the writer (process 0) moves files."""
    steps = checkpoints.saved_steps(workdir)
    if start_over or not steps:
        _check_init_from(config, workdir)
        with signals.deferred():  # a run's files are moved whole or not at all
            aside = workdir_lib.set_aside(workdir) if is_writer else None
        if aside:
            why = "--start_over" if start_over and steps else "nothing in it to resume"
            say(f"Set the earlier run's files aside into {aside} ({why}); starting afresh")
        return Plan(resume=False)

    saved = config_lib.flatten(checkpoints.read_run_config(workdir))
    config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    refused, data_changes, changes = [], [], {}
    weights_carry_over = True
    for name, value in config_lib.flatten(config).items():
        old = saved.get(name)
        if old == value:
            continue
        if name in CONDITIONING_FIELDS and not config.model.num_classes and not saved.get(
                "model.num_classes"):
            continue  # an unconditional model builds neither
        if name.startswith("model."):
            refused.append(f"config.{name}={value!r} differs from {old!r}")
            weights_carry_over &= name in SHAPE_KEEPING_MODEL_FIELDS
        elif name == "train.ema_decay" and _is_on(old) != _is_on(value):
            refused.append(f"config.train.ema_decay={value!r} turns the average of G "
                           f"{'on' if _is_on(value) else 'off'} (it was {old!r})")
        elif name == "data.prepared" or (
                name == "data.num_workers" and config.data.prepared == "off"):
            data_changes.append(f"config.{name}={value!r} differs from {old!r} in "
                                f"{workdir_lib.CONFIG_FILE}")
        elif not _is_run_setting(name):
            changes[name] = (old, value)
    if refused:
        carry = (f" (with --config.init_from={workdir} to start from its weights)"
                 if weights_carry_over else "")
        raise checkpoints.IncompatibleCheckpointError(
            f"{' and '.join(refused)} in {config_path}, whose checkpoints this run would "
            f"resume: they shape the saved networks. Go back to the saved value, or train "
            f"in a new workdir{carry}")
    saved_dataset = checkpoints.saved_dataset(workdir, steps[-1])
    _check_classes(config, workdir, saved_dataset, dataset)
    if change := _data_change(saved_dataset, dataset):
        data_changes.append(change)
    if data_changes and not config.data.reset_position:
        raise checkpoints.DataPositionError(
            f"cannot resume {workdir}: {'; '.join(data_changes)}, so the data position "
            f"saved with its checkpoints does not fit. "
            f"{checkpoints.position_advice(workdir)}")
    if changes:
        say("Changed since the checkpoints: " + ", ".join(
            f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items()))
    if data_changes:
        say(f"Restarting the data order ({'; '.join(data_changes)}; "
            f"data.reset_position=true), keeping the step and the weights")
    elif saved_dataset is None and config.data.prepared == "off":
        say(f"Note: the checkpoints in {workdir} do not record their dataset (saved by an "
            f"earlier version), so a change of its images cannot be noticed")
    return Plan(resume=True, changes=changes, reset_position=bool(data_changes))
