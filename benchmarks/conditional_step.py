"""The class-conditional train steps beside the unconditional one, alternating in one process.

  python benchmarks/conditional_step.py --resolutions=64,128 --batch_size=64 --steps=3 \
      --repeats=3

Each of --conditionings is a conditional DCGAN of --num_classes classes named G+D:
`concat+concat` (the defaults: one-hot planes into G's input and D's), `cbn+projection`
(class-conditional BatchNorm in G, a projection D). All steps are compiled first; then each
repeat times --steps steps of each in turn, so a noisy shared host slows all alike. Printed
per resolution: wall and process CPU time per image (medians over the repeats) and each
step's ratio to the unconditional one: of CPU time per image (the target, <= 1.05, on a
host) and of wall time (on an accelerator, where the host's CPU time only waits).
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
flags.DEFINE_integer("num_classes", 10, "Classes of the conditional models.")
flags.DEFINE_list("conditionings", ["concat+concat", "cbn+projection"],
                  "Conditional models to time, each G's g_cond+D's d_cond.")
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
              f"{'wall ms/img':>12} {'CPU ms/img':>11} {'CPU ratio':>10} {'wall ratio':>11}")
    print(header)
    print("-" * len(header))
    b = FLAGS.batch_size
    models = {"unconditional": {}}
    for name in FLAGS.conditionings:
        g_cond, d_cond = name.split("+")
        models[name] = {"num_classes": FLAGS.num_classes, "g_cond": g_cond, "d_cond": d_cond}
    for res in map(int, FLAGS.resolutions):
        runs = {}
        for name, fields in models.items():
            compiled, state, batch, compile_s = compiled_step(
                jax_config(res, b, FLAGS.dtype, **fields))
            state = run_steps(compiled, state, batch, 1)  # warm-up
            runs[name] = {"step": compiled, "state": state, "batch": batch,
                          "compile_s": compile_s, "wall": [], "cpu": []}
        for _ in range(FLAGS.repeats):
            for run in runs.values():
                run["state"], wall, cpu = timed(run["step"], run["state"], run["batch"],
                                                FLAGS.steps)
                run["wall"].append(1e3 * wall / (FLAGS.steps * b))
                run["cpu"].append(1e3 * cpu / (FLAGS.steps * b))
        base = {what: statistics.median(runs["unconditional"][what]) for what in ("wall", "cpu")}
        for name, run in runs.items():
            label = name if name == "unconditional" else f"{name}, {FLAGS.num_classes} cl."
            wall, cpu = (statistics.median(run[what]) for what in ("wall", "cpu"))
            print(f"{res:>4} {b:>6} {FLAGS.dtype:>9} {label:>22} {run['compile_s']:>10.1f} "
                  f"{wall:>12.4f} {cpu:>11.4f} {cpu / base['cpu']:>10.3f} "
                  f"{wall / base['wall']:>11.3f}", flush=True)


if __name__ == "__main__":
    app.run(main)
