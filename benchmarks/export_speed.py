"""Images/s of an exported generator in each runtime beside the trainer's own `sample`.

  python benchmarks/export_speed.py --config_name=configs/mnist.py --batch_sizes=1,256 \\
      --repeats=3

Whoever deploys G picks a runtime, and `sample files` is what they would otherwise run: this
tells them what each costs on the host. G of `--config_name` is saved untrained (speed does
not depend on the weights) to a temporary workdir, exported once in every format
(`dcgan_jax.exporters`), and each runtime is loaded once, as a server would:

  sample        `Sampler.generate`: the trainer's jitted G with the host-tuned convolutions,
                and the host's uint8 conversion (what `sample files` computes per batch)
  sample files  `sample.write_files` end to end, PNG writing included (largest batch only)
  stablehlo     `jax.export.deserialize` once, then a jitted `exported.call`
  onnx          one onnxruntime InferenceSession (CPUExecutionProvider, default threads)
  savedmodel    the SavedModel's `serving_default` signature, loaded once

The artifacts' rows time their float32 images as the runtime returns them. Every runtime is
run once first (compiling it) and its images are checked against `sample`'s, so the table
times runtimes that compute the same images. Then `--repeats` rounds run each runtime in
turn (the order rotating each round) for at least `--min_seconds`, so that a load that comes
and goes on a shared host weighs on all alike. Printed: medians over the rounds of images/s,
wall and process CPU time (all threads) per image, and images/s over `sample`'s.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import runpy
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np
from absl import app, flags, logging

from dcgan_jax import cli, host_cpu

flags.DEFINE_string("config_name", "configs/mnist.py", "Config file of the generator "
                    "(get_config()); its weights are not trained.")
flags.DEFINE_list("batch_sizes", ["1", "256"], "Images per generator call.")
flags.DEFINE_integer("repeats", 3, "Timed rounds of every runtime, alternating.")
flags.DEFINE_float("min_seconds", 2.0, "Least time of one runtime in one round.")
flags.DEFINE_integer("files_batches", 3, "Batches per `sample files` call (the largest "
                     "batch size).")
FLAGS = flags.FLAGS
RUNTIMES = ("stablehlo", "onnx", "savedmodel")
FILES_ROW = "sample files"
# Largest difference of an artifact's uint8 images from `sample`'s: rounding at a half.
MAX_UINT8_DIFFERENCE = 1

Inputs = dict[str, np.ndarray]


def make_workdir(workdir: str, config_name: str) -> Any:
    """A run's workdir (config.json and a checkpoint of G's initial state), as the export
    tests make one: what `export` and `sample` read, without training. Returns the config."""
    import jax  # noqa: F401  (after cli.set_up_process)

    from dcgan_jax import checkpoints, parallel
    from dcgan_jax import config as config_lib
    from dcgan_jax import step as step_lib
    config = runpy.run_path(config_name)["get_config"]()
    state = step_lib.create_train_state(config, parallel.make_mesh(), total_steps=1)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    classes = [str(k) for k in range(config.model.num_classes)]
    manager = checkpoints.make_manager(workdir)
    checkpoints.save(manager, int(state.step), state,
                     dataset={"dataset": config.dataset} | ({"classes": classes}
                                                            if classes else {}))
    checkpoints.finish_saves(manager)
    return config


def load_runtimes(folder: str) -> dict[str, Callable[[Inputs], np.ndarray]]:
    """Each artifact loaded once: a function of the inputs that returns its images (the
    exporters' RUNNERS load the file on every call, which is not what a server does)."""
    import jax

    from dcgan_jax import exporters
    path = {name: os.path.join(folder, exporters.FILES[name]) for name in RUNTIMES}
    with open(path["stablehlo"], "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    call = jax.jit(exported.call)

    import onnxruntime
    session = onnxruntime.InferenceSession(path["onnx"], providers=["CPUExecutionProvider"])

    tf = exporters.tensorflow_on_cpu()
    serve = tf.saved_model.load(path["savedmodel"]).signatures["serving_default"]
    return {
        "stablehlo": lambda inputs: np.asarray(call(*inputs.values())),
        "onnx": lambda inputs: session.run(["images"], inputs)[0],
        "savedmodel": lambda inputs: serve(**{name: tf.constant(value)
                                              for name, value in inputs.items()})[
                                                  "images"].numpy(),
    }


def timed(run: Callable[[], Any], calls: int) -> tuple[float, float]:
    """Wall and process CPU seconds of `calls` calls of `run`."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        run()
    return time.perf_counter() - wall, time.process_time() - cpu


def calls_for(run: Callable[[], Any], min_seconds: float) -> int:
    """Calls of `run` (already warm) that last about `min_seconds`, from one timed call."""
    wall, _ = timed(run, 1)
    return max(1, math.ceil(min_seconds / max(wall, 1e-6)))


def table_row(name: str, batch: int, walls: list[float], cpus: list[float], images: int,
              base: float | None) -> tuple[str, float]:
    """The markdown row of one runtime from its rounds' wall and CPU seconds for `images`
    images each; and its median images/s."""
    rate = statistics.median(images / wall for wall in walls)
    wall_ms = statistics.median(1e3 * wall / images for wall in walls)
    cpu_ms = statistics.median(1e3 * cpu / images for cpu in cpus)
    ratio = f"{rate / base:.2f}" if base else "1.00"
    return (f"| {name} | {batch} | {rate:,.1f} | {wall_ms:.3f} | {cpu_ms:.3f} | {ratio} |",
            rate)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail("export_speed", f"unexpected arguments: {' '.join(argv[1:])}")
    cli.set_up_process()
    cli.quiet_logs()
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax warns about read-only managers
    import jax

    from dcgan_jax import exporters, images
    from dcgan_jax.sample import Sampler, write_files
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    largest = max(batch_sizes)
    print(f"host: {host_cpu.description()}; jax {jax.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as root:
        workdir, folder = os.path.join(root, "run"), os.path.join(root, "export")
        config = make_workdir(workdir, FLAGS.config_name)
        m = config.model
        print(f"G of {FLAGS.config_name}: {m.family}, {m.resolution}x{m.resolution}x"
              f"{m.channels}, nz={m.nz}, ngf={m.ngf}, {m.num_classes} classes; untrained",
              flush=True)
        generator, state = exporters.restore_generator(workdir)
        started = time.perf_counter()
        exporters.export(generator, state, list(exporters.FILES), folder,
                         say=lambda line: print(f"  {line}", flush=True))
        print(f"exported in {time.perf_counter() - started:.1f} s", flush=True)
        del state
        sampler = Sampler(workdir)
        runtimes = load_runtimes(folder)
        files_folder = os.path.join(root, "files")

        def write(batch: int, num: int) -> None:
            shutil.rmtree(files_folder, ignore_errors=True)
            with contextlib.redirect_stderr(io.StringIO()):  # tqdm's progress bar
                write_files(sampler, files_folder, num, seed=0, batch_size=batch)

        rows = []
        for batch in batch_sizes:
            z = sampler.latents(0, batch)
            labels = sampler.classes(batch)
            inputs = {"z": z} | ({} if labels is None else {"label": labels.astype(np.int32)})
            sharded = batch % jax.device_count() == 0
            runs: dict[str, Callable[[], Any]] = {
                "sample": lambda z=z, labels=labels, sharded=sharded: sampler.generate(
                    z, sharded=sharded, labels=labels)}
            for name in RUNTIMES:
                runs[name] = lambda run=runtimes[name], inputs=inputs: run(inputs)
            if batch == largest:
                num = FLAGS.files_batches * batch
                runs[FILES_ROW] = lambda batch=batch, num=num: write(batch, num)
            expected = None
            warm = {}
            for name, run in runs.items():
                started = time.perf_counter()
                out = run()
                warm[name] = time.perf_counter() - started
                if name in RUNTIMES:
                    difference = int(np.max(np.abs(images.to_uint8(out).astype(np.int16)
                                                   - expected)))
                    if difference > MAX_UINT8_DIFFERENCE:
                        raise AssertionError(f"{name} at batch {batch}: uint8 images differ "
                                             f"from sample's by {difference}")
                elif name == "sample":
                    expected = out.astype(np.int16)
            print(f"batch {batch}, first call (compile) s: "
                  + ", ".join(f"{name} {s:.2f}" for name, s in warm.items()), flush=True)
            calls = {name: calls_for(run, FLAGS.min_seconds) for name, run in runs.items()}
            walls = {name: [] for name in runs}
            cpus = {name: [] for name in runs}
            names = list(runs)
            for round_index in range(FLAGS.repeats):
                k = round_index % len(names)
                for name in names[k:] + names[:k]:
                    wall, cpu = timed(runs[name], calls[name])
                    walls[name].append(wall)
                    cpus[name].append(cpu)
            base = None
            for name in names:
                per_call = FLAGS.files_batches * batch if name == FILES_ROW else batch
                row, rate = table_row(name, batch, walls[name], cpus[name],
                                      per_call * calls[name], base)
                base = base or rate
                rows.append(row)
            print(f"batch {batch}, calls per round: "
                  + ", ".join(f"{name} {n}" for name, n in calls.items()), flush=True)
    print(f"\nmedians of {FLAGS.repeats} alternating rounds, each runtime >= "
          f"{FLAGS.min_seconds:g} s a round\n")
    print("| runtime | batch | images/s (median) | wall ms/image | CPU ms/image | vs sample |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    app.run(main)
