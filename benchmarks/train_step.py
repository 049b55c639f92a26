"""Compile time, steps/s and images/s of the jitted train step on the devices present.

  python benchmarks/train_step.py --config=configs/default.py \
      --resolutions=64,128 --batch_sizes=64 --dtypes=float32 --steps=20

Batches are random uint8 images already on the device, so only the step is timed.
"""

from __future__ import annotations

import itertools
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dcgan_jax import cli, parallel
from dcgan_jax import config as config_lib
from dcgan_jax import step as step_lib

from jax_step import cpu_description

config_flags.DEFINE_config_file("config", "configs/default.py", "Base config file.")
flags.DEFINE_list("resolutions", ["64", "128"], "Resolutions to time.")
flags.DEFINE_list("batch_sizes", ["64"], "Global batch sizes to time.")
flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes to time.")
flags.DEFINE_list("msg", ["false"], "MSG off and/or on: false,true.")
flags.DEFINE_integer("steps", 20, "Timed steps after the compiling one.")
FLAGS = flags.FLAGS


def time_step(config, steps: int) -> dict[str, float]:
    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = parallel.make_mesh()
    state = step_lib.create_train_state(config, mesh, total_steps=steps + 1)
    train_step = step_lib.make_train_step(config, mesh)
    r, c, b = config.model.resolution, config.model.channels, config.train.batch_size
    local = np.random.default_rng(0).integers(
        0, 256, (config.train.d_steps, b // jax.process_count(), r, r, c), dtype=np.uint8)
    real = parallel.global_batch({"image": local}, mesh, batch_axis=1)
    start = time.perf_counter()
    state, metrics = train_step(state, real)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, real)
    jax.block_until_ready((state, metrics))
    steps_per_s = steps / (time.perf_counter() - start)
    return {"compile_s": compile_s, "steps_per_s": steps_per_s,
            "images_per_s": steps_per_s * b}


def main(argv):
    del argv
    cli.set_up_process()
    cli.quiet_logs()  # no library INFO lines (a missing libtpu, orbax saves)
    print(f"host: {cpu_description()}")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), jax {jax.__version__}")
    header = f"{'res':>5} {'msg':>5} {'batch':>6} {'dtype':>9} {'compile s':>10} " \
             f"{'steps/s':>9} {'images/s':>10}"
    print(header)
    print("-" * len(header))
    for res, msg, batch, dtype in itertools.product(
            FLAGS.resolutions, FLAGS.msg, FLAGS.batch_sizes, FLAGS.dtypes):
        config = FLAGS.config.copy_and_resolve_references()
        config.model.resolution = int(res)
        config.model.msg = msg.lower() == "true"
        config.train.batch_size = int(batch)
        config.dtype = dtype
        row = time_step(config, FLAGS.steps)
        print(f"{res:>5} {str(config.model.msg):>5} {batch:>6} {dtype:>9} "
              f"{row['compile_s']:>10.1f} {row['steps_per_s']:>9.2f} "
              f"{row['images_per_s']:>10.1f}", flush=True)


if __name__ == "__main__":
    app.run(main)
