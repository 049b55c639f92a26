"""Where a train step's time goes: XLA operations ranked by device time per step.

  python benchmarks/profile_step.py --resolution=128 --batch_size=256 --dtype=bfloat16

The step (pytorch/examples' settings, `jax_step.py`) is compiled, warmed up and timed by
wall clock, then run again under `jax.profiler.trace`. Each operation of the compiled step
(a cuDNN convolution, a fusion, a copy...) is matched with its line in the optimised HLO,
which names its kind, its output shape and the JAX code it came from. On a CPU, independent
operations run concurrently, so their times can add up to more than the wall time, and some
convolutions are recorded at a fraction of their cost (see benchmarks/NOTES.md). Only
jax, flax, optax and absl are needed.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time
from typing import Any

import jax
from absl import app, flags

from dcgan_jax import cli

from jax_step import compiled_step, jax_config, run_steps

flags.DEFINE_integer("resolution", 64, "Image resolution.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (config.dtype).")
flags.DEFINE_integer("steps", 10, "Steps timed, and then traced.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
flags.DEFINE_integer("top", 30, "Operations listed.")
flags.DEFINE_string("trace_dir", "", "Where the trace is kept (default: a temporary folder).")
FLAGS = flags.FLAGS

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
    """Kind, output shape and JAX source of each instruction of an optimised HLO module."""
    instructions = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode = match.groups()
        target = re.search(r'custom_call_target="([^"]+)"', line)
        kind = re.search(r"kind=(k\w+)", line)
        source = re.search(r'op_name="([^"]+)"', line)
        instructions[name] = {
            "kind": target.group(1) if target else (
                f"{opcode}:{kind.group(1)}" if kind else opcode),
            "shape": re.sub(r"\{[^}]*\}", "", shape),
            "source": source.group(1) if source else ""}
    return instructions


def _stats(event: Any) -> dict[str, Any]:
    return dict(event.stats)


def op_durations(trace_file: str) -> dict[str, float]:
    """Total nanoseconds per HLO operation in a trace: the "XLA Ops" lines of accelerator
    planes, or on a CPU the host events that name an `hlo_op`."""
    profile = jax.profiler.ProfileData.from_file(trace_file)
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in profile.planes:
        if plane.name.startswith("/device:"):
            for line in plane.lines:
                if line.name == "XLA Ops":
                    for event in line.events:
                        totals[event.name.lstrip("%").split(" ")[0]] += event.duration_ns
    if totals:
        return totals
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                op = _stats(event).get("hlo_op")
                if op:
                    totals[op] += event.duration_ns
    return totals


def category(info: dict[str, str]) -> str:
    """A coarse class of an HLO instruction, for the summary."""
    lowered = info["kind"].lower()
    if "conv" in lowered or info["source"].endswith("conv_general_dilated"):
        return "convolutions"
    if ("gemm" in lowered or "matmul" in lowered or lowered.startswith("dot")
            or info["source"].endswith("dot_general")):
        return "matrix products"
    if lowered.startswith(("copy", "transpose")):
        return "copies and transposes"
    if lowered.startswith("fusion"):
        return "fusions (elementwise, reductions)"
    return "other"


def main(argv: list[str]) -> None:
    del argv
    cli.set_up_process()
    cli.quiet_logs()  # no library INFO lines (a missing libtpu, orbax saves)
    r, b = FLAGS.resolution, FLAGS.batch_size
    compiled, state, real, compile_s = compiled_step(jax_config(r, b, FLAGS.dtype))
    print(f"{jax.devices()[0].device_kind}, {r}x{r}, batch {b}, {FLAGS.dtype}: compiled in "
          f"{compile_s:.1f} s")
    state = run_steps(compiled, state, real, FLAGS.warmup)
    start = time.perf_counter()
    state = run_steps(compiled, state, real, FLAGS.steps)
    wall_ms = 1e3 * (time.perf_counter() - start) / FLAGS.steps
    trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    with jax.profiler.trace(trace_dir):
        run_steps(compiled, state, real, FLAGS.steps)
    trace_file = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]

    instructions = hlo_instructions(compiled.as_text())
    totals = op_durations(trace_file)
    per_step = {op: ns / 1e6 / FLAGS.steps for op, ns in totals.items()}
    busy_ms = sum(per_step.values())
    print(f"wall {wall_ms:.2f} ms/step ({b * 1e3 / wall_ms:,.0f} images/s); operations "
          f"{busy_ms:.2f} ms/step over {len(per_step)} distinct operations; trace {trace_file}")

    unknown = {"kind": "?", "shape": "", "source": ""}
    by_category: dict[str, float] = collections.defaultdict(float)
    for op, ms in per_step.items():
        by_category[category(instructions.get(op, unknown))] += ms
    print("\n| class | ms/step | share |\n|---|---:|---:|")
    for name, ms in sorted(by_category.items(), key=lambda item: -item[1]):
        print(f"| {name} | {ms:.3f} | {100 * ms / busy_ms:.1f}% |")

    print("\n| operation | kind | output | ms/step | share | from |\n|---|---|---|---:|---:|---|")
    for op, ms in sorted(per_step.items(), key=lambda item: -item[1])[:FLAGS.top]:
        info = instructions.get(op, unknown)
        print(f"| {op} | {info['kind']} | {info['shape'][:60]} | {ms:.3f} "
              f"| {100 * ms / busy_ms:.1f}% | {info['source'][-90:]} |")


if __name__ == "__main__":
    app.run(main)
