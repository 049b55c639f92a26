"""Whether a run continues its workdir's checkpoints, refuses in one line, or starts afresh.

Decided before the start-up tables and before anything in the workdir is touched:
- config fields that change the networks' trees or what the saved state means (model.*,
  EMA on or off) must equal the saved ones;
- the data position saved with the checkpoints must fit the data: the same dataset (its
  identity, `dataset.json`), the same `data.prepared` and, decoding every epoch, the same
  `data.num_workers`; `data.reset_position=true` restarts the data order instead;
- other changed fields (the recipe: loss, augment, rates, ...) are named in one line and
  recorded in metrics.jsonl;
- an earlier run's files are never overwritten: a fresh start sets them aside first.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from dcgan_jax import checkpoints, config as config_lib, paths
from dcgan_jax import workdir as workdir_lib

# Fields that neither shape the state nor change the training math: changed silently.
RUN_SETTINGS = ("train.num_steps", "train.num_epochs", "init_from", "log_every",
                "sample_every", "sample_every_epochs", "ckpt_every", "ckpt_every_epochs",
                "keep_checkpoints", "sample_grid", "data.prefetch", "data.cache_dir",
                "data.tfds_data_dir", "data.reset_position", "data.num_workers")
RUN_SETTING_PREFIXES = ("eval.",)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the run does with the workdir: `resume` its checkpoints (restoring the data
    position unless `reset_position`), with the recipe `changes` {field: (old, new)}."""

    resume: bool
    changes: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    reset_position: bool = False


def read_dataset_record(workdir: str) -> dict[str, Any] | None:
    """The identity of the data the checkpoints were trained on; None for workdirs made
    before it was recorded."""
    path = os.path.join(workdir, workdir_lib.DATASET_FILE)
    if not paths.is_file(path):
        return None
    try:
        record = json.loads(paths.read_text(path))
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}  # damaged: differs from any dataset, so a resume needs reset_position


def write_run_files(workdir: str, config: Any, dataset: dict[str, Any]) -> None:
    """config.json and dataset.json of the run about to train (process 0 only)."""
    paths.write_text(os.path.join(workdir, workdir_lib.CONFIG_FILE),
                     config_lib.to_json(config))
    paths.write_text(os.path.join(workdir, workdir_lib.DATASET_FILE),
                     json.dumps(dataset, indent=2, sort_keys=True))


def _is_run_setting(name: str) -> bool:
    return name in RUN_SETTINGS or name.startswith(RUN_SETTING_PREFIXES)


def _data_change(saved_dataset: dict[str, Any] | None, dataset: dict[str, Any]) -> str | None:
    """What changed in the data since the checkpoints, in a few words; None if nothing."""
    if saved_dataset is None or saved_dataset == dataset:
        return None
    if saved_dataset.get("dataset") != dataset["dataset"]:
        return (f"config.dataset={dataset['dataset']!r} differs from "
                f"{saved_dataset.get('dataset')!r}")
    if saved_dataset.get("records") != dataset["records"]:
        return (f"the dataset {dataset['dataset']} holds {dataset['records']:,} records, "
                f"{saved_dataset.get('records')} when the checkpoints were saved")
    return f"the files of the dataset {dataset['dataset']} changed since the checkpoints"


def plan(config: Any, workdir: str, dataset: dict[str, Any], start_over: bool,
         say: Callable[[str], None], is_writer: bool = True) -> Plan:
    """Decides what the run does with `workdir` (see the module's docstring); raises
    CheckpointError in one line where it must not go on. Every process of a run decides
    alike; only the writer (process 0) moves files."""
    steps = checkpoints.saved_steps(workdir)
    if start_over or not steps:
        if is_writer and (aside := workdir_lib.set_aside(workdir)):
            why = ("--start_over" if start_over and steps
                   else "nothing in it to resume")
            say(f"Set the earlier run's files aside into {aside} ({why}); starting afresh")
        return Plan(resume=False)

    saved = config_lib.flatten(checkpoints.read_run_config(workdir))
    config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    refused, data_changes, changes = [], [], {}
    for name, value in config_lib.flatten(config).items():
        old = saved.get(name)
        if old == value:
            continue
        position_field = name in ("data.prepared", "dataset") or (
            name == "data.num_workers" and config.data.prepared == "off")
        if name.startswith("model."):
            refused.append(f"config.{name}={value!r} differs from {old!r}")
        elif name == "train.ema_decay" and (old > 0) != (value > 0):
            refused.append(f"config.train.ema_decay={value!r} turns the average of G "
                           f"{'on' if value > 0 else 'off'} (it was {old!r})")
        elif position_field:
            data_changes.append(f"config.{name}={value!r} differs from {old!r} in "
                                f"{workdir_lib.CONFIG_FILE}")
        elif not _is_run_setting(name):
            changes[name] = (old, value)
    if refused:
        raise checkpoints.IncompatibleCheckpointError(
            f"{' and '.join(refused)} in {config_path}, whose checkpoints this run would "
            f"resume: they shape the saved networks. Go back to the saved value, or train "
            f"in a new workdir (with --config.init_from={workdir} to start from its "
            f"weights)")
    if (change := _data_change(read_dataset_record(workdir), dataset)) and not any(
            "config.dataset=" in c for c in data_changes):
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
    return Plan(resume=True, changes=changes, reset_position=bool(data_changes))

