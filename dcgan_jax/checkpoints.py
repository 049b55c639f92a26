"""Orbax checkpoints of a run: both networks, optimizers, EMA, RNG, step and data position.

A checkpoint is written asynchronously into `WORKDIR/checkpoints/STEP` and becomes visible
only once complete, so a crash mid-save never damages the checkpoints already there.
"""

from __future__ import annotations

import math
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dcgan_jax import config as config_lib
from dcgan_jax import parallel, step as step_lib


class CheckpointError(ValueError):
    """A checkpoint that was asked for is missing or cannot be read."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


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
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics or {}, force=True)


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
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # orbax raises many types for unreadable files
        raise CheckpointError(f"checkpoint {os.path.join(manager.directory, str(step))} "
                              f"cannot be read: {str(error).splitlines()[0]}") from None
    return restored["state"]


def read_run_config(workdir: str) -> Any:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist; is {workdir!r} a dcgan_jax workdir?")
    with open(path) as f:
        return config_lib.from_json(f.read())


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
    mine = (state.g.params, state.d.params)
    theirs = (other.g.params, other.d.params)
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
