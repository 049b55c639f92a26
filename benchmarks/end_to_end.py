"""The training run beside the bare step: does the input pipeline and the work around the
step (progress lines, sample grids, checkpoints) keep up?

  python benchmarks/end_to_end.py --resolutions=64 --images=2000 --batch_size=64
  python benchmarks/end_to_end.py --resolutions=64,128 --batch_size=256 --dtype=bfloat16  # GPU

Writes a folder of CelebA-sized (178x218) JPEGs, then prints per resolution, in one process:
  - the bare jitted step on a batch already on the devices (images/s);
  - the data path alone: decoding every image as `data.prepared=off` does (in the process,
    and in one worker per core), and batches gathered from prepared data as training does
    (images/s, and CPU ms per image of this process);
  - the real training loop (`train.train_and_evaluate`) over the same folder with prepared
    data, timed from the end of its first step to the end of its last, a sample grid and a
    checkpoint included (written at the last step);
  - the loop's speed over the bare step's (bare step and loop timed alternately,
    `--repeats` times, medians shown).
`--demo` adds the same comparison for the demo config (configs/mnist.py), at its own
sample and checkpoint intervals.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from dcgan_jax import cli, data, parallel, prepared, train
from dcgan_jax import config as config_lib
from dcgan_jax import step as step_lib

from jax_step import cpu_description

flags.DEFINE_list("resolutions", ["64"], "Model resolutions.")
flags.DEFINE_integer("images", 2000, "JPEG files in the folder.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_string("dtype", "float32", "Compute dtype of the step.")
flags.DEFINE_integer("loop_steps", 21, "Steps of the timed training run (the first compiles).")
flags.DEFINE_integer("data_batches", 200, "Batches timed for the prepared data path.")
flags.DEFINE_bool("demo", True, "Also time the demo config's loop against its bare step.")
flags.DEFINE_integer("demo_steps", 501, "Steps of the demo's timed training run, at the "
                     "demo's own sample and checkpoint intervals.")
flags.DEFINE_integer("repeats", 2, "Bare step and loop are timed alternately this often; "
                     "the medians are shown.")
FLAGS = flags.FLAGS


def write_jpegs(folder: str, count: int) -> None:
    """Smooth colour fields with grain, so that JPEG sizes and decode times are photo-like
    (about 15 kB each, as CelebA's are 11 kB)."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (14, 11, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((178, 218), Image.Resampling.BICUBIC), np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def timed(fn, count: int) -> tuple[float, float]:
    """(items/s, CPU ms per item of this process) of fn(), which handles `count` items."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return count / wall, 1000 * cpu / count


def consume(iterator, batches: int) -> None:
    """Reads batches and drops each, as training does: keeping them all would time the
    first-touch page faults of fresh memory instead of the pipeline."""
    for _ in range(batches):
        next(iterator)


def bare_step(config, steps: int) -> float:
    """Images/s of the jitted step alone on one batch already on the devices."""
    mesh = parallel.make_mesh()
    state = step_lib.create_train_state(config, mesh, total_steps=steps + 1)
    r, c, b = config.model.resolution, config.model.channels, config.train.batch_size
    local = np.random.default_rng(0).integers(0, 256, (config.train.d_steps, b, r, r, c),
                                              dtype=np.uint8)
    real = parallel.global_batch({"image": local}, mesh, batch_axis=1)
    compiled = step_lib.make_train_step(config, mesh).lower(state, real).compile()
    state, metrics = compiled(state, real)
    jax.block_until_ready(metrics)

    def run():
        nonlocal state, metrics
        for _ in range(steps):
            state, metrics = compiled(state, real)
        jax.block_until_ready((state, metrics))
    return timed(run, steps * b)[0]


def decode_path(config, source, workers: int, batches: int) -> tuple[float, float]:
    config = config.copy_and_resolve_references()
    config.data.prepared, config.data.num_workers = "off", workers
    iterator = data.make_pipeline(config, source, 0, 1)
    next(iterator)  # starts the workers
    result = timed(lambda: consume(iterator, batches), batches * config.train.batch_size)
    iterator.close()
    return result


def prepared_path(config, source, batches: int) -> tuple[float, float]:
    images = data.prepare_shard(config, source, prepared.Shard(), say=lambda line: None)
    iterator = prepared.BatchIterator(images.images, config.train.batch_size, config.seed)
    for _ in range(len(images.images) // config.train.batch_size):  # into the page cache
        next(iterator)
    return timed(lambda: consume(iterator, batches), batches * config.train.batch_size)


def training_loop(config, workdir: str) -> float:
    """Images/s of the real loop from the end of its first step to the end of its last, as
    its last progress line reports it (log_every = the run's length)."""
    with contextlib.redirect_stdout(io.StringIO()):
        train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return json.loads(f.readlines()[-1])["images_per_sec"]


def loop_config(config, steps: int, keep_intervals: bool = False):
    """A run of `steps` steps whose one progress line times them all; unless
    `keep_intervals`, it writes one sample grid and one checkpoint, at its last step."""
    config = config.copy_and_resolve_references()
    config.train.num_steps = steps
    config.log_every = steps
    if not keep_intervals:
        config.sample_every = config.ckpt_every = steps
    return config


def bare_and_loop(config, root: str, steps: int, keep_intervals: bool = False):
    """Median images/s of the bare step and of the loop, timed alternately."""
    bare, loop = [], []
    for _ in range(FLAGS.repeats):
        bare.append(bare_step(config, steps - 1))
        workdir = os.path.join(root, f"run{len(os.listdir(root))}")
        loop.append(training_loop(loop_config(config, steps, keep_intervals), workdir))
        shutil.rmtree(workdir)
    return float(np.median(bare)), float(np.median(loop))


def main(argv):
    del argv
    cli.set_up_process()
    cli.quiet_logs()  # no library INFO lines (a missing libtpu, orbax saves)
    cpus = os.cpu_count()
    print(f"host: {cpu_description()}")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}); host cores: {cpus}; {FLAGS.images} JPEGs of 178x218; "
          f"batch {FLAGS.batch_size}, {FLAGS.dtype}")
    root = tempfile.mkdtemp(prefix="dcgan_jax_e2e_")
    try:
        folder = os.path.join(root, "jpegs")
        write_jpegs(folder, FLAGS.images)
        header = (f"{'config':>10} {'bare step img/s':>16} {'decode 1 proc img/s':>20} "
                  f"{'ms/img':>7} {f'decode {cpus} workers img/s':>22} "
                  f"{'prepared img/s':>15} {'ms/img':>7} {'loop img/s':>11} {'loop/bare':>10}")
        print(header)
        print("-" * len(header))
        for res in map(int, FLAGS.resolutions):
            config = config_lib.get_default_config()
            config.dataset = f"folder:{folder}"
            config.model.resolution = res
            config.train.batch_size = FLAGS.batch_size
            config.dtype = FLAGS.dtype
            config.data.random_flip = True
            config.data.cache_dir = os.path.join(root, "cache")
            source = data.open_source(config.dataset)
            batches = max(2, 512 // FLAGS.batch_size)
            one, one_ms = decode_path(config, source, 0, batches)
            many, _ = decode_path(config, source, cpus, 4 * batches)
            fast, fast_ms = prepared_path(config, source, FLAGS.data_batches)
            bare, loop = bare_and_loop(config, root, FLAGS.loop_steps)
            print(f"{res:>10} {bare:>16.1f} {one:>20.0f} {one_ms:>7.2f} {many:>22.0f} "
                  f"{fast:>15.0f} {fast_ms:>7.4f} {loop:>11.1f} {loop / bare:>10.3f}",
                  flush=True)
        if FLAGS.demo:
            demo = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "mnist.py")
            config = runpy.run_path(demo)["get_config"]()
            config.data.cache_dir = os.path.join(root, "cache")
            bare, loop = bare_and_loop(config, root, FLAGS.demo_steps, keep_intervals=True)
            print(f"{'demo':>10} {bare:>16.1f} {'':>20} {'':>7} {'':>22} {'':>15} {'':>7} "
                  f"{loop:>11.1f} {loop / bare:>10.3f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
