"""The training run: data, state, the jitted step, samples, checkpoints and resume."""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils

from dcgan_jax import checkpoints, data, images, losses, parallel, paths, reporting, resume
from dcgan_jax import signals
from dcgan_jax import config as config_lib
from dcgan_jax import step as step_lib
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.reporting import say

# Independent of config.seed, so that grids of different runs show the same latents.
BENCHMARK_NOISE_SEED = 2015


def benchmark_noise(config: Any) -> jax.Array:
    rows, cols = config_lib.grid_shape(config.sample_grid)
    return jax.random.normal(jax.random.PRNGKey(BENCHMARK_NOISE_SEED),
                             (rows * cols, config.model.nz))


def is_due(every: int, step: int, total_steps: int) -> bool:
    """Whether a periodic action runs after `step`: every `every` steps, and at the last."""
    return step % every == 0 or step == total_steps


def _say_every_process(line: str) -> None:
    """A line from each process (they prepare their own shards), named when several."""
    prefix = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    print(prefix + line, flush=True)


def train_and_evaluate(config: Any, workdir: str, start_over: bool = False
                       ) -> step_lib.GANState:
    """Trains until config's last step, resuming from the workdir's newest readable
    checkpoint, or, with `start_over`, afresh after setting the earlier run's files aside;
    holds the workdir's lock (process 0) throughout."""
    config_lib.validate(config, jax.device_count(), jax.process_count())  # for API callers
    workdir = workdir_lib.create(workdir)
    with workdir_lib.locked(workdir, take=jax.process_index() == 0):
        return _train(config, workdir, start_over)


def _plan(config: Any, workdir: str, dataset: dict[str, Any],
          start_over: bool) -> resume.Plan:
    """resume.plan on every process; only process 0 sets files aside, and the others wait
    for it before they touch the workdir."""
    is_writer = jax.process_index() == 0
    plan = resume.plan(config, workdir, dataset, start_over,
                       say if is_writer else lambda line: None, is_writer)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dcgan_jax: the workdir is ready")
    return plan


def _train(config: Any, workdir: str, start_over: bool) -> step_lib.GANState:
    reporting.hide_gpus_from_tensorflow()
    mesh = parallel.make_mesh()
    source = data.open_source(config.dataset, config.data.cache_dir, config.data.tfds_data_dir)
    steps_per_epoch = data.steps_per_epoch(config, source, jax.process_count())
    dataset = data.source_identity(config.dataset, source)
    # Before the tables, and before anything in the workdir is touched.
    plan = _plan(config, workdir, dataset, start_over)
    total_steps = config.train.num_steps or config.train.num_epochs * steps_per_epoch
    num_epochs = -(-total_steps // steps_per_epoch)
    sample_every, ckpt_every, evaluate_every = (
        config_lib.interval_steps(every, epochs, steps_per_epoch) for every, epochs in (
            (config.sample_every, config.sample_every_epochs),
            (config.ckpt_every, config.ckpt_every_epochs),
            (config.eval.every, config.eval.every_epochs)))
    grid_rows, grid_cols = config_lib.grid_shape(config.sample_grid)
    say(reporting.config_table(config), reporting.devices_line(),
        f"Data: {config.dataset}, {len(source):,} records, {steps_per_epoch:,} steps per "
        f"epoch, {total_steps:,} steps in all")

    state = step_lib.create_train_state(config, mesh, total_steps)
    say(reporting.parameter_table("Generator", state.g.params),
        reporting.parameter_table("Discriminator", state.d.params))
    if jax.process_index() == 0:
        for folder in checkpoints.stale_temporaries(workdir):
            say(f"Removing {folder}, a save that a stopped run left unfinished")
    manager = checkpoints.make_manager(workdir, config.keep_checkpoints,
                                       keep_best_fid=evaluate_every > 0)
    iterator = data.make_pipeline(config, source, jax.process_index(), jax.process_count(),
                                  say=_say_every_process)
    start = 0
    if plan.resume:
        state, start = checkpoints.restore_newest_readable(
            manager, step_lib.abstract_train_state(config, mesh, total_steps),
            None if plan.reset_position else iterator, say, config.data.reset_position)
        say(f"Resumed from step {start} in {manager.directory}")
    elif config.init_from:
        state = checkpoints.load_weights(config.init_from, state, mesh)
        say(f"Starting from the weights of {config.init_from}")
    samples_dir = os.path.join(workdir, workdir_lib.SAMPLES_DIR)
    if jax.process_index() == 0 and not paths.exists(os.path.join(samples_dir, "real.png")):
        real = data.sample_images(config, source, grid_rows * grid_cols)
        images.save_png(os.path.join(samples_dir, "real.png"), images.make_grid(real, grid_rows))

    train_step = step_lib.make_train_step(config, mesh)
    noise = jax.device_put(benchmark_noise(config), parallel.replicated(mesh))
    # Compiled now, at start-up, rather than inside the timed steps at the first grid or save.
    generate = {use_ema: jax.jit(
        functools.partial(step_lib.generate_images, config=config, use_ema=use_ema),
        out_shardings=parallel.replicated(mesh)).lower(state, noise).compile()
        for use_ema in ([False, True] if state.ema is not None else [False])}
    all_finite = jax.jit(step_lib.all_finite).lower(state).compile()

    reporter = reporting.Reporter(workdir, total_steps, steps_per_epoch, num_epochs,
                                  config.train.batch_size * config.train.d_steps,
                                  step_lib.learning_rate_fns(config, total_steps),
                                  losses.objective(config.train.loss).d_output)
    evaluator = None
    if evaluate_every:
        from dcgan_jax.evaluation.evaluator import Evaluator
        evaluator = Evaluator(config, mesh, source)
        say(evaluator.reference_line)
    stop = (signals.stop_requests() if jax.process_count() == 1
            else threading.Event())  # several hosts stop at orbax's preemption sync
    unreadable = data.UnreadableReport()
    batches = data.DeviceBatches(iterator, mesh, config.train.d_steps, unreadable.add)

    # Host work on a step's results (writing grids, saving checkpoints) is started on the
    # device at that step and finished after the next step is queued, so the device is not
    # left idle while the host waits for it, fetches, encodes or writes.
    def write_samples(step: int) -> Callable[[], None]:
        generated = [("_ema" if use_ema else "", fn(state, noise))
                     for use_ema, fn in generate.items()]

        def finish() -> None:
            for suffix, fakes in generated:
                grid = images.make_grid(images.to_uint8(parallel.fetch(fakes)), grid_rows)
                if jax.process_index() == 0:
                    images.save_png(os.path.join(samples_dir, f"step_{step:07d}{suffix}.png"),
                                    grid)
                reporter.write_image(step, f"samples{suffix}", grid)
        return finish

    def require_finite(step: int, finite: jax.Array) -> None:
        if not bool(parallel.fetch(finite)):
            raise reporting.NonFiniteLossError(
                f"parameters became non-finite by step {step}; not saved")

    def evaluate(step: int) -> dict[str, float]:
        require_finite(step, all_finite(state))
        start_time = time.perf_counter()
        scores = evaluator(state)
        best = checkpoints.best_fid(manager)
        if best is None or scores["fid"] < best[1]:
            best = (step, scores["fid"])
        reporter.write_evaluation(step, scores, time.perf_counter() - start_time,
                                  evaluator.describe(state), best)
        return scores

    def save_checkpoint(step: int, position: data.Position,
                        scores: dict[str, float] | None) -> Callable[[], None]:
        finite = all_finite(state)
        snapshot = jax.tree.map(jnp.copy, state)  # the next step donates `state`

        def finish() -> None:
            require_finite(step, finite)
            checkpoints.save(manager, step, snapshot, position, scores, dataset)
        return finish

    step = start
    compile_start = time.perf_counter()
    try:
        preempted = False
        later: list[Callable[[], None]] = []
        for step in range(start + 1, total_steps + 1):
            real, position = batches.take()
            state, metrics = train_step(state, real)
            if step < total_steps:
                batches.prefetch()
            for work in later:
                work()
            later = []
            checkpoints.check_saves(manager)
            if step == start + 1:
                jax.block_until_ready(metrics)
                say(f"Compiled and ran the first step in "
                    f"{time.perf_counter() - compile_start:.1f} s")
                reporter.start_timer(step)
                if jax.process_index() == 0:  # Only now: a run stopped or refused at
                    # start-up leaves the earlier run's files as they were.
                    resume.write_run_config(workdir, config)
                    reporter.rewind(start, plan.changes)
            due = functools.partial(is_due, step=step, total_steps=total_steps)
            reporter.push(step, metrics if due(config.log_every) else None)
            if due(steps_per_epoch):
                if warning := unreadable.message():
                    logging.warning("process %d: %s", jax.process_index(), warning)
            if due(sample_every):
                later.append(write_samples(step))
            scores = evaluate(step) if evaluator and due(evaluate_every) else None
            preempted = (manager.reached_preemption(step) if jax.process_count() > 1
                         else stop.is_set())
            if due(ckpt_every) or preempted or scores is not None:
                later.append(save_checkpoint(step, position, scores))
            if preempted:
                break
        for work in later:
            work()
        reporter.flush()
    except reporting.NonFiniteLossError as error:
        checkpoints.finish_saves(manager)
        last_good = manager.latest_step()
        kept = (f"the last good checkpoint is step {last_good} in {manager.directory}"
                if last_good is not None else "no checkpoint was saved before it")
        raise reporting.NonFiniteLossError(
            f"{error}; stopped: {kept}. Lower config.train.lr_d and lr_g") from None
    finally:
        checkpoints.finish_saves(manager)
    if preempted:
        say(f"Stopped at step {step}; checkpoint saved. Run the same command to resume.")
    else:
        say(f"Done: {step} steps. Samples in {samples_dir}, checkpoints in {manager.directory}")
    best = checkpoints.best_fid(manager) if evaluator else None
    if best:
        say(f"Best FID {best[1]:.3f} at step {best[0]}, kept in "
            f"{os.path.join(manager.directory, str(best[0]))}")
    return state
