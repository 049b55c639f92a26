"""What a run tells its user: start-up tables, progress lines, metrics.jsonl, TensorBoard.

Only process 0 writes. Scalars reach the host one step late (see `Reporter.push`) so that
logging never stalls the device queue.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers, parameter_overview

from dcgan_jax import config as config_lib
from dcgan_jax import losses, parallel, paths
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.errors import UserFacingError
from dcgan_jax.evaluation import metrics as metrics_lib

# How often a bucket workdir receives the events and metrics.jsonl written so far.
BUCKET_SYNC_SECONDS = 60.0


class NonFiniteLossError(UserFacingError, FloatingPointError):
    """A logged loss, or a weight about to be saved, became NaN or infinite."""


def hide_gpus_from_tensorflow() -> None:
    """TensorFlow only reads data and writes summaries here: keep it off the accelerators.

    Must run before TensorFlow first touches a device, which clu and tfds do lazily.
    """
    tf.config.set_visible_devices([], "GPU")


def say(*lines: str) -> None:
    if jax.process_index() == 0:
        print(*lines, sep="\n", flush=True)


def config_table(config: Any) -> str:
    flat = config_lib.flatten(config)
    width = max(map(len, flat))
    rows = [f"  {name:<{width}}  {value!r}" for name, value in flat.items()]
    return "\n".join(["Config:"] + rows)


def devices_line() -> str:
    kinds = sorted({d.device_kind for d in jax.devices()})
    return (f"Devices: {jax.device_count()} x {', '.join(kinds)} ({jax.default_backend()}) "
            f"over {jax.process_count()} process(es); this is process {jax.process_index()}")


def parameter_table(name: str, params: Any) -> str:
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    overview = parameter_overview.get_parameter_overview(params, include_stats=False)
    return f"{name}: {count:,} parameters\n{overview}"


def truncate_metrics(path: str, last_step: int, note: dict[str, Any] | None = None) -> None:
    """Drops lines logged after `last_step`, the checkpoint a resumed run continues from,
    and any line a crash left half-written; then appends `note` (a resume's changed
    config fields), if any."""
    if not paths.exists(path) and note is None:
        return

    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= last_step
        except (ValueError, KeyError, TypeError):
            return False

    lines = [line + "\n" for line in (paths.read_text(path).splitlines()
                                      if paths.exists(path) else []) if kept(line)]
    if note is not None:
        lines.append(json.dumps(note) + "\n")
    paths.write_text(path, "".join(lines))


class Reporter:
    """Progress lines, `metrics.jsonl` and TensorBoard scalars and images.

    `d_output` says what the logged D outputs are (`losses.Objective.d_output`): the
    progress line names them D(x) for probabilities and score(x) for raw scores, and each
    metrics.jsonl line of training says which in its `d_output` field.
    """

    def __init__(self, workdir: str, total_steps: int, steps_per_epoch: int,
                 num_epochs: int, images_per_step: int, learning_rates: dict[str, Any],
                 d_output: str = losses.PROBABILITY):
        self.is_writer = jax.process_index() == 0
        # Objects in a bucket cannot be appended to: there, the events and metrics.jsonl
        # are written in a local folder that is copied up now and then (see `_sync`).
        self.mirror = (paths.Mirror(workdir, fetch=(workdir_lib.METRICS_FILE,))
                       if self.is_writer and paths.is_remote(workdir) else None)
        folder = self.mirror.local if self.mirror else workdir
        self.writer = metric_writers.create_default_writer(
            folder, just_logging=not self.is_writer, asynchronous=True)
        self.jsonl_path = os.path.join(folder, workdir_lib.METRICS_FILE)
        self._last_sync = time.monotonic()
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.num_epochs = num_epochs
        self.images_per_step = images_per_step
        self.learning_rates = learning_rates
        self.d_output = d_output
        self._pending: tuple[int, dict[str, jax.Array]] | None = None
        self._last_time: float | None = None
        self._last_step = 0

    def rewind(self, last_step: int, changes: dict[str, tuple[Any, Any]]) -> None:
        """Continues metrics.jsonl after `last_step`, the step a run starts from, recording
        the config fields a resume changed (see `truncate_metrics`)."""
        note = ({"step": last_step, "time": time.time(), "config_changes": {
            name: list(values) for name, values in changes.items()}} if changes else None)
        truncate_metrics(self.jsonl_path, last_step, note)

    def start_timer(self, step: int) -> None:
        """Marks where speed is measured from (after compilation)."""
        self._last_time, self._last_step = time.perf_counter(), step

    def exclude(self, seconds: float) -> None:
        """Leaves time spent outside training steps (evaluations) out of the speed."""
        if self._last_time is not None:
            self._last_time += seconds

    def push(self, step: int, metrics: dict[str, jax.Array] | None) -> None:
        """Queues step's device metrics and writes the queued ones of an earlier step.

        By the time the earlier step's values are fetched, `step` is already queued on the
        device, so the fetch does not leave the device idle.
        """
        if self._pending is not None:
            self.write(*self._pending)
            self._sync(every=BUCKET_SYNC_SECONDS)
        self._pending = (step, metrics) if metrics is not None else None

    def flush(self) -> None:
        self.push(0, None)
        self.writer.flush()
        self._sync()

    def _sync(self, every: float = 0.0) -> None:
        """Copies a bucket workdir's events and metrics.jsonl up, unless the last copy is
        less than `every` seconds old: each copy uploads the files whole."""
        if self.mirror is not None and time.monotonic() - self._last_sync >= every:
            self.writer.flush()
            self.mirror.sync()
            self._last_sync = time.monotonic()

    def write(self, step: int, device_metrics: dict[str, jax.Array]) -> None:
        values = {k: float(v) for k, v in parallel.fetch(device_metrics).items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(
                f"non-finite values at step {step}: "
                + ", ".join(f"{k}={v}" for k, v in bad.items()))
        now = time.perf_counter()
        steps_per_sec = ((step - self._last_step) / (now - self._last_time)
                         if self._last_time is not None and step > self._last_step else 0.0)
        self._last_time, self._last_step = now, step
        # The rates this step's updates used: optimizer counts start at 0.
        values.update({name: float(fn(step - 1)) for name, fn in self.learning_rates.items()})
        values["steps_per_sec"] = steps_per_sec
        values["images_per_sec"] = steps_per_sec * self.images_per_step
        epoch = min((step - 1) // self.steps_per_epoch + 1, self.num_epochs)
        if not self.is_writer:
            return
        self.writer.write_scalars(step, values)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "time": time.time(), **values,
                                "d_output": self.d_output}) + "\n")
        eta = (datetime.timedelta(seconds=round((self.total_steps - step) / steps_per_sec))
               if steps_per_sec > 0 else "?")
        d = losses.D_OUTPUT_NAMES[self.d_output]
        penalty = f" (penalty {values['penalty']:.3f})" if "penalty" in values else ""
        say(f"[{datetime.datetime.now():%H:%M:%S}] epoch {epoch}/{self.num_epochs} "
            f"step {step}/{self.total_steps} | loss_D {values['loss_d']:.3f}{penalty} "
            f"loss_G {values['loss_g']:.3f} {d}(x) {values['d_real']:.3f} "
            f"{d}(G(z)) {values['d_fake_before']:.3f}/{values['d_fake_after']:.3f} | "
            f"{steps_per_sec:.2f} step/s {values['images_per_sec']:.0f} img/s | ETA {eta}")

    def write_evaluation(self, step: int, values: dict[str, float], seconds: float,
                         description: str, best: tuple[int, float] | None,
                         best_metric: str = "fid") -> None:
        """An evaluation's values: TensorBoard, metrics.jsonl and one line."""
        self.exclude(seconds)
        if not self.is_writer:
            return
        self.writer.write_scalars(step, {**values, "eval_seconds": seconds})
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values,
                                "eval_seconds": seconds}) + "\n")
        label, value = metrics_lib.METRIC_LABELS, metrics_lib.format_value
        best_text = (f"; best {label[best_metric]} {value(best_metric, best[1])} at step "
                     f"{best[0]}" if best else "")
        say(f"[{datetime.datetime.now():%H:%M:%S}] step {step} | "
            f"{metrics_lib.evaluation_text(values)} ({description}, {seconds:.1f} s){best_text}")

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.is_writer:
            self.writer.write_images(step, {name: image[None]})
