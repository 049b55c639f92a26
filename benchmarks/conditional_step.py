"""The class-conditional train step beside the unconditional one, alternating in one process.

  python benchmarks/conditional_step.py --resolutions=64,128 --batch_size=64 --steps=3 \
      --repeats=3

The conditional step is the defaults' conditional DCGAN: class-conditional BatchNorm in G
(`cbn`), a projection D (`projection`), --num_classes classes. Both steps are compiled first;
then each repeat times --steps steps of one and then of the other, so a noisy shared host
slows both alike. Printed per resolution: wall and process CPU time per image (medians over
the repeats) and the conditional/unconditional ratio of CPU time per image, which the
target (<= 1.05) is about.
"""

from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags

from dcgan_jax import cli

from jax_step import compiled_step, cpu_description, jax_config, run_steps

flags.DEFINE_list("resolutions", ["64", "128"], "Resolutions to time.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")
flags.DEFINE_integer("num_classes", 10, "Classes of the conditional model.")
flags.DEFINE_integer("steps", 3, "Steps per timed repeat.")
flags.DEFINE_integer("repeats", 3, "Timed repeats of each step, alternating.")
FLAGS = flags.FLAGS


def timed(compiled, state, batch, steps: int):
    wall, cpu = time.perf_counter(), time.process_time()
    state = run_steps(compiled, state, batch, steps)
    return state, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str]) -> None:
    del argv
    cli.set_up_process()
    cli.quiet_logs()
    print(f"host: {cpu_description()}")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), jax {jax.__version__}")
    header = (f"{'res':>4} {'batch':>6} {'dtype':>9} {'model':>22} {'compile s':>10} "
              f"{'wall ms/img':>12} {'CPU ms/img':>11} {'CPU ratio':>10}")
    print(header)
    print("-" * len(header))
    b = FLAGS.batch_size
    for res in map(int, FLAGS.resolutions):
        runs = {}
        for classes in (0, FLAGS.num_classes):
            compiled, state, batch, compile_s = compiled_step(
                jax_config(res, b, FLAGS.dtype, num_classes=classes))
            state = run_steps(compiled, state, batch, 1)  # warm-up
            runs[classes] = {"step": compiled, "state": state, "batch": batch,
                             "compile_s": compile_s, "wall": [], "cpu": []}
        for _ in range(FLAGS.repeats):
            for run in runs.values():
                run["state"], wall, cpu = timed(run["step"], run["state"], run["batch"],
                                                FLAGS.steps)
                run["wall"].append(1e3 * wall / (FLAGS.steps * b))
                run["cpu"].append(1e3 * cpu / (FLAGS.steps * b))
        base = statistics.median(runs[0]["cpu"])
        for classes, run in runs.items():
            name = (f"cbn+projection, {classes} cl." if classes else "unconditional")
            cpu = statistics.median(run["cpu"])
            print(f"{res:>4} {b:>6} {FLAGS.dtype:>9} {name:>22} {run['compile_s']:>10.1f} "
                  f"{statistics.median(run['wall']):>12.2f} {cpu:>11.2f} "
                  f"{cpu / base:>10.3f}", flush=True)


if __name__ == "__main__":
    app.run(main)
