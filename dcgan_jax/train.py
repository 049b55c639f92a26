"""The training run: data, state, the jitted step, samples, checkpoints and resume.

`train_and_evaluate` sets a run up (`Run`: the data, the state, the compiled functions and
the writers), then loops over the steps. Every periodic action of the loop (the unreadable
files' warning, sample grids, evaluations) is an entry of a table of (interval, action), as
big_vision's `itstime` does; checkpoints follow their interval, an evaluation (which ranks
them) and a stop request.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dcgan_jax import checkpoints, data, images, losses, parallel, paths, reporting, resume, signals
from dcgan_jax import config as config_lib
from dcgan_jax import step as step_lib
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.evaluation import metrics as metrics_lib
from dcgan_jax.reporting import say

# Independent of config.seed, so that grids of different runs show the same latents.
BENCHMARK_NOISE_SEED = 2015


def benchmark_noise(config: Any) -> jax.Array:
    rows, cols = config_lib.grid_shape(config.sample_grid)
    return jax.random.normal(jax.random.PRNGKey(BENCHMARK_NOISE_SEED),
                             (rows * cols, config.model.nz))


def grid_labels(config: Any) -> np.ndarray | None:
    """The classes of a conditional model's grid images: 0, 1, ... in reading order, so a
    grid as wide as the classes has one class per column; None when unconditional."""
    if not config.model.num_classes:
        return None
    rows, cols = config_lib.grid_shape(config.sample_grid)
    return (np.arange(rows * cols) % config.model.num_classes).astype(np.int32)


def check_labels(config: Any, source: Any) -> None:
    """A conditional model needs a labelled source with as many classes as it has."""
    wanted, found = config.model.num_classes, source.num_classes
    if not wanted or wanted == found:
        return
    if not found:
        raise config_lib.ConfigError(
            f"config.model.num_classes={wanted} needs labels, and config.dataset="
            f"{config.dataset!r} has none (folders: one subfolder per class; tfds: the "
            f"feature config.data.label_key={config.data.label_key!r}); use "
            f"config.model.num_classes=0 for an unconditional GAN")
    raise config_lib.ConfigError(
        f"config.model.num_classes={wanted} differs from the {found} classes of "
        f"config.dataset={config.dataset!r}; use --config.model.num_classes={found}")


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
    # The random streams of the command line (cli.set_up_process) for API callers too.
    with (workdir_lib.locked(workdir, take=jax.process_index() == 0),
          jax.threefry_partitionable(False)):
        return _loop(Run(config, workdir, start_over))


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


class Run:
    """A run between its set-up and its last step: the data, the state (replaced at every
    step: the step donates it), the compiled functions, the writers, and the periodic
    actions, each of which reads the state of the step it runs after."""

    def __init__(self, config: Any, workdir: str, start_over: bool):
        self.config, self.workdir = config, workdir
        reporting.hide_gpus_from_tensorflow()
        mesh = parallel.make_mesh()
        source = data.open_source(config.dataset, config.data.cache_dir,
                                  config.data.tfds_data_dir, config.data.label_key)
        check_labels(config, source)
        self.steps_per_epoch = data.steps_per_epoch(config, source, jax.process_count())
        self.dataset = source.identity()
        # Before the tables, and before anything in the workdir is touched.
        self.plan = _plan(config, workdir, self.dataset, start_over)
        self.total_steps = (config.train.num_steps
                            or config.train.num_epochs * self.steps_per_epoch)
        num_epochs = -(-self.total_steps // self.steps_per_epoch)
        sample_every, self.ckpt_every, evaluate_every = (
            config_lib.interval_steps(every, epochs, self.steps_per_epoch)
            for every, epochs in ((config.sample_every, config.sample_every_epochs),
                                  (config.ckpt_every, config.ckpt_every_epochs),
                                  (config.eval.every, config.eval.every_epochs)))
        self.grid_rows, grid_cols = config_lib.grid_shape(config.sample_grid)
        classes = (f", {source.num_classes} classes" if source.num_classes else "")
        say(reporting.config_table(config), reporting.devices_line(),
            f"Data: {config.dataset}, {len(source):,} records{classes}, "
            f"{self.steps_per_epoch:,} steps per epoch, {self.total_steps:,} steps in all")

        conv_forms = _agreed_conv_forms()
        self.state = step_lib.create_train_state(config, mesh, self.total_steps)
        say(reporting.parameter_table("Generator", self.state.g.params),
            reporting.parameter_table("Discriminator", self.state.d.params))
        if jax.process_index() == 0:
            for folder in checkpoints.stale_temporaries(workdir):
                say(f"Removing {folder}, a save that a stopped run left unfinished")
        self.manager = checkpoints.make_manager(workdir, config.keep_checkpoints,
                                                keep_best=(config.eval.best_metric
                                                           if evaluate_every > 0 else None))
        iterator = data.make_pipeline(config, source, jax.process_index(),
                                      jax.process_count(), say=_say_every_process)
        self.start = 0
        if self.plan.resume:
            self.state, self.start = checkpoints.restore_newest_readable(
                self.manager, step_lib.abstract_train_state(config, mesh, self.total_steps),
                None if self.plan.reset_position else iterator, say,
                config.data.reset_position)
            say(f"Resumed from step {self.start} in {self.manager.directory}")
        elif config.init_from:
            self.state = checkpoints.load_weights(config.init_from, self.state, mesh)
            say(f"Starting from the weights of {config.init_from}")
        self.samples_dir = os.path.join(workdir, workdir_lib.SAMPLES_DIR)
        labels = grid_labels(config)
        self._write_real_grid(source, labels)

        self.train_step = step_lib.make_train_step(config, mesh, conv_forms)
        self.noise = jax.device_put(benchmark_noise(config), parallel.replicated(mesh))
        self.labels = (None if labels is None
                       else jax.device_put(labels, parallel.replicated(mesh)))
        # Compiled now, at start-up, rather than inside the timed steps at the first grid
        # or save.
        self.generate = {use_ema: jax.jit(
            functools.partial(step_lib.generate_images, config=config, use_ema=use_ema),
            out_shardings=parallel.replicated(mesh)).lower(
                self.state, self.noise, labels=self.labels).compile()
            for use_ema in ([False, True] if self.state.ema is not None else [False])}
        self.all_finite = jax.jit(step_lib.all_finite).lower(self.state).compile()

        self.reporter = reporting.Reporter(
            workdir, self.total_steps, self.steps_per_epoch, num_epochs,
            config.train.batch_size * config.train.d_steps,
            step_lib.learning_rate_fns(config, self.total_steps),
            losses.objective(config.train.loss).d_output)
        self.evaluator = None
        if evaluate_every:
            from dcgan_jax.evaluation.evaluator import Evaluator
            self.evaluator = Evaluator(config, mesh, source)
            say(self.evaluator.reference_line)
        self.stop = (signals.stop_requests() if jax.process_count() == 1
                     else threading.Event())  # several hosts stop at orbax's preemption sync
        self.unreadable = data.UnreadableReport()
        self.batches = data.DeviceBatches(iterator, mesh, config.train.d_steps,
                                          self.unreadable.add)
        self.scores: dict[str, float] | None = None
        # The periodic actions after a step, in this order: (interval in steps, action).
        # An interval of 0 never fires; an action may return work to finish after the next
        # step is queued (see `_loop`).
        self.periodic_actions: Sequence[tuple[int, Callable[[int], Any]]] = (
            (self.steps_per_epoch, self.warn_unreadable),
            (sample_every, self.write_samples),
            (evaluate_every if self.evaluator else 0, self.evaluate),
        )

    def _write_real_grid(self, source: Any, labels: np.ndarray | None) -> None:
        """samples/real.png: dataset images of the grid's classes, once per workdir."""
        path = os.path.join(self.samples_dir, "real.png")
        if jax.process_index() != 0 or paths.exists(path):
            return
        rows, cols = config_lib.grid_shape(self.config.sample_grid)
        real, _ = data.sample_images(self.config, source, rows * cols, classes=labels)
        images.save_png(path, images.make_grid(real, rows))

    # Host work on a step's results (writing grids, saving checkpoints) is started on the
    # device at that step and finished after the next step is queued, so the device is not
    # left idle while the host waits for it, fetches, encodes or writes.
    def write_samples(self, step: int) -> Callable[[], None]:
        generated = [("_ema" if use_ema else "", fn(self.state, self.noise, labels=self.labels))
                     for use_ema, fn in self.generate.items()]

        def finish() -> None:
            for suffix, fakes in generated:
                grid = images.make_grid(images.to_uint8(parallel.fetch(fakes)), self.grid_rows)
                if jax.process_index() == 0:
                    images.save_png(
                        os.path.join(self.samples_dir, f"step_{step:07d}{suffix}.png"), grid)
                self.reporter.write_image(step, f"samples{suffix}", grid)
        return finish

    def warn_unreadable(self, step: int) -> None:
        del step
        if warning := self.unreadable.message():
            logging.warning("process %d: %s", jax.process_index(), warning)

    def require_finite(self, step: int, finite: jax.Array) -> None:
        if not bool(parallel.fetch(finite)):
            raise reporting.NonFiniteLossError(
                f"parameters became non-finite by step {step}; not saved")

    def evaluate(self, step: int) -> None:
        """FID and KID now; their checkpoint is saved after this step (`_loop`)."""
        self.require_finite(step, self.all_finite(self.state))
        start_time = time.perf_counter()
        scores = self.evaluator(self.state)
        metric = self.config.eval.best_metric
        best = checkpoints.best_score(self.manager, metric)
        rank = checkpoints.ranking(metric)
        if best is None or rank(scores) < rank({metric: best[1]}):
            best = (step, scores[metric])
        self.reporter.write_evaluation(step, scores, time.perf_counter() - start_time,
                                       self.evaluator.describe(self.state), best, metric)
        self.scores = scores

    def save_checkpoint(self, step: int, position: data.Position) -> Callable[[], None]:
        finite = self.all_finite(self.state)
        snapshot = jax.tree.map(jnp.copy, self.state)  # the next step donates the state
        scores, self.scores = self.scores, None

        def finish() -> None:
            self.require_finite(step, finite)
            checkpoints.save(self.manager, step, snapshot, position, scores, self.dataset)
        return finish

    def stop_requested(self, step: int) -> bool:
        """A stop signal (one host), or orbax's preemption sync point (several hosts)."""
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        return self.stop.is_set()

    def after_first_step(self, metrics: step_lib.Metrics, started: float) -> None:
        jax.block_until_ready(metrics)
        say(f"Compiled and ran the first step in {time.perf_counter() - started:.1f} s")
        self.reporter.start_timer(self.start + 1)
        if jax.process_index() == 0:  # Only now: a run stopped or refused at start-up
            # leaves the earlier run's files as they were.
            resume.write_run_config(self.workdir, self.config)
            self.reporter.rewind(self.start, self.plan.changes)


def _agreed_conv_forms() -> Any:
    """The CPU forms of the strided convolutions every process compiles: process 0's."""
    from dcgan_jax import strided_conv
    forms, change = strided_conv.agree_across_processes()
    if change:
        logging.warning(change)
    return forms


def _loop(run: Run) -> step_lib.GANState:
    config, total_steps = run.config, run.total_steps
    step = run.start
    compile_start = time.perf_counter()
    preempted = False
    try:
        later: list[Callable[[], None]] = []
        for step in range(run.start + 1, total_steps + 1):
            batch, position = run.batches.take()
            run.state, metrics = run.train_step(run.state, batch)
            if step < total_steps:
                run.batches.prefetch()
            for work in later:
                work()
            later = []
            checkpoints.check_saves(run.manager)
            if step == run.start + 1:
                run.after_first_step(metrics, compile_start)
            due = functools.partial(is_due, step=step, total_steps=total_steps)
            run.reporter.push(step, metrics if due(config.log_every) else None)
            for every, action in run.periodic_actions:
                if every and due(every) and (work := action(step)) is not None:
                    later.append(work)
            preempted = run.stop_requested(step)
            if due(run.ckpt_every) or preempted or run.scores is not None:
                later.append(run.save_checkpoint(step, position))
            if preempted:
                break
        for work in later:
            work()
        run.reporter.flush()
    except reporting.NonFiniteLossError as error:
        checkpoints.finish_saves(run.manager)
        last_good = run.manager.latest_step()
        kept = (f"the last good checkpoint is step {last_good} in {run.manager.directory}"
                if last_good is not None else "no checkpoint was saved before it")
        raise reporting.NonFiniteLossError(
            f"{error}; stopped: {kept}. Lower config.train.lr_d and lr_g") from None
    finally:
        checkpoints.finish_saves(run.manager)
    if preempted:
        say(f"Stopped at step {step}; checkpoint saved. Run the same command to resume.")
    else:
        say(f"Done: {step} steps. Samples in {run.samples_dir}, checkpoints in "
            f"{run.manager.directory}")
    metric = run.config.eval.best_metric
    best = checkpoints.best_score(run.manager, metric) if run.evaluator else None
    if best:
        say(f"Best {metrics_lib.METRIC_LABELS[metric]} "
            f"{metrics_lib.format_value(metric, best[1])} "
            f"at step {best[0]}, kept in "
            f"{os.path.join(run.manager.directory, str(best[0]))}")
    return run.state
