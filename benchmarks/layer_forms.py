"""Every form of each strided layer of the models, alone, beside PyTorch's, on this host.

  python benchmarks/layer_forms.py --resolution=64 --batch_size=64 --repeats=7

For each stride-2 layer shape of the networks at `--resolution` (D's convolutions; G's
transposed convolutions are the adjoints of the same shapes), three operations are timed:
the convolution (`fwd`), its adjoint (`adjoint`: G's upsampling and D's input gradients) and
its kernel gradient (`kernel grad`), each in every form `dcgan_jax.strided_conv` has, beside
torch's conv2d, conv_transpose2d and conv2d_weight (NCHW, as pytorch/examples runs them).
`picked` is what the train step runs on this host (the custom-VJP functions themselves).

Each form is checked against torch's result, then all are timed in interleaved rounds;
each cell is the best of `--repeats`. Every other round runs in reverse order, and a pause
after each torch operation lets its spinning OpenMP threads go idle. A train step runs each
shape's `fwd` and `adjoint` about 4 times and its kernel gradient 3 times (D on reals and
fakes, D for G's loss, G), the first layer's adjoint twice; the last line weights the
times so, to say which layers hold the gap to PyTorch. Only jax, flax, absl and torch are
needed.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags

from dcgan_jax import cli
from dcgan_jax import strided_conv as sc
from dcgan_jax.models import num_blocks

from jax_step import NDF, cpu_description

flags.DEFINE_integer("resolution", 64, "Model resolution whose layer shapes are timed.")
flags.DEFINE_integer("batch_size", 64, "Images per operation.")
flags.DEFINE_integer("repeats", 7, "Interleaved rounds; each cell is the best.")
flags.DEFINE_integer("threads", 0, "torch.set_num_threads; 0: every core this process may use.")
FLAGS = flags.FLAGS

# After each of its operations, torch's OpenMP threads spin for a while (libgomp's
# GOMP_SPINCOUNT) on the cores the next operation would use: wait that out.
OPENMP_SPIN_SECONDS = 0.05

# How often a train step runs each operation of one layer shape (see the docstring); the
# first layer's adjoint runs twice (G's last upsampling, D's input gradient for G's loss).
USES_PER_STEP = {"fwd": 4, "adjoint": 4, "kernel grad": 3}
FIRST_LAYER_ADJOINTS = 2


def layer_shapes(resolution: int) -> list[tuple[int, int, int]]:
    """(input side, input channels, output channels) of D's strided convolutions."""
    return [(resolution >> i, 3 if i == 0 else NDF << (i - 1), NDF << i)
            for i in range(num_blocks(resolution))]


def jax_forms(host: sc.CpuForms) -> dict[str, dict[str, Callable[..., jax.Array]]]:
    """Every form of each operation, in this host's chunks; `picked` as the layers run it."""
    picked_kernel_grad = lambda x, g, k: jax.vjp(  # noqa: E731
        lambda k: sc.downsample_conv(x, k, host), k)[1](g)[0]
    matmuls = functools.partial(sc.kernel_grad_by_matmuls, forms=host)
    return {
        "fwd": {"picked": lambda x, k: sc.downsample_conv(x, k, host),
                "direct": sc.direct_conv, "space-to-depth": sc.space_to_depth_conv,
                "patches": functools.partial(sc.conv_by_patches, forms=host)},
        "adjoint": {"picked": lambda x, k: sc.upsample_conv(x, k, host),
                    "input-dilated": sc.conv_transpose_input_dilated,
                    "space-to-depth": sc.conv_transpose_by_space_to_depth,
                    "patches": sc.conv_transpose_by_patches},
        "kernel grad": {"picked": picked_kernel_grad,
                        "convolution": sc.kernel_grad_by_convolution,
                        "matmuls [16C, out]": functools.partial(matmuls, wide_minor=False),
                        "matmuls [out, 16C]": functools.partial(matmuls, wide_minor=True)},
    }


def time_layer(side: int, c_in: int, c_out: int, batch: int,
               repeats: int) -> dict[tuple[str, str], float]:
    """Best seconds of each (operation, form) for one layer shape."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, side, side, c_in), np.float32)
    kernel = (0.02 * rng.standard_normal((4, 4, c_in, c_out))).astype(np.float32)
    grad_y = rng.standard_normal((batch, side // 2, side // 2, c_out), np.float32)
    jx, jk, jg = map(jnp.asarray, (x, kernel, grad_y))
    args = {"fwd": (jx, jk), "adjoint": (jg, jk), "kernel grad": (jx, jg, jk)}
    runs: dict[tuple[str, str], Callable[[], object]] = {}
    for op, forms in jax_forms(sc.CpuForms.of_host()).items():
        for name, form in forms.items():
            compiled = jax.jit(form).lower(*args[op]).compile()
            runs[(op, name)] = (lambda c=compiled, a=args[op]: jax.block_until_ready(c(*a)))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tk = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    tg = torch.from_numpy(grad_y.transpose(0, 3, 1, 2).copy())
    runs[("fwd", "torch")] = lambda: F.conv2d(tx, tk, stride=2, padding=1)
    runs[("adjoint", "torch")] = lambda: F.conv_transpose2d(tg, tk, stride=2, padding=1)
    runs[("kernel grad", "torch")] = lambda: torch.nn.grad.conv2d_weight(
        tx, tk.shape, tg, stride=2, padding=1)
    best = {key: float("inf") for key in runs}
    with torch.no_grad():
        check_agreement(runs)
        for round_ in range(repeats):
            order = list(runs.items())
            for key, run in order if round_ % 2 == 0 else reversed(order):
                start = time.perf_counter()
                run()
                best[key] = min(best[key], time.perf_counter() - start)
                if key[1] == "torch":
                    time.sleep(OPENMP_SPIN_SECONDS)
    return best


def check_agreement(runs: dict[tuple[str, str], Callable[[], object]]) -> None:
    """Runs each form once (a warm-up) and checks it against torch's result: a form that
    computes something else must not be timed."""
    to_jax_layout = {"fwd": (0, 2, 3, 1), "adjoint": (0, 2, 3, 1), "kernel grad": (2, 3, 1, 0)}
    expected = {op: np.asarray(run()).transpose(to_jax_layout[op])
                for (op, name), run in runs.items() if name == "torch"}
    for (op, name), run in runs.items():
        if name != "torch":
            error = np.abs(np.asarray(run()) - expected[op]).max() / np.abs(expected[op]).max()
            if error > 1e-4:
                raise AssertionError(f"{op} by {name} differs from torch's by {error:.1e}")


def main(argv: list[str]) -> None:
    del argv
    cli.set_up_process()
    cli.quiet_logs()
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    host = sc.CpuForms.of_host()
    print(f"host: {cpu_description()}; jax {jax.__version__}, torch {torch.__version__} "
          f"(threads={torch.get_num_threads()}); kernel gradients "
          f"{'[out, 16C] where wider' if host.kernel_grad_wide_minor else '[16C, out]'} in "
          f"{host.kernel_grad_chunk_bytes >> 20} MB chunks; batch {FLAGS.batch_size}, "
          f"best of {FLAGS.repeats}, ms")
    weighted = {"picked": 0.0, "fastest": 0.0, "torch": 0.0}
    print("\n| layer | operation | form | ms | / torch |\n|---|---|---|---:|---:|")
    for side, c_in, c_out in layer_shapes(FLAGS.resolution):
        best = time_layer(side, c_in, c_out, FLAGS.batch_size, FLAGS.repeats)
        layer = f"{side}x{side}, {c_in} -> {c_out}"
        for op in USES_PER_STEP:
            forms = {name: t for (o, name), t in best.items() if o == op}
            for name, seconds in forms.items():
                print(f"| {layer} | {op} | {name} | {seconds * 1e3:.1f} | "
                      f"{seconds / forms['torch']:.2f} |")
            ours = [t for name, t in forms.items() if name != "torch"]
            uses = FIRST_LAYER_ADJOINTS if (op, c_in) == ("adjoint", 3) else USES_PER_STEP[op]
            weighted["picked"] += uses * forms["picked"]
            weighted["fastest"] += uses * min(ours)
            weighted["torch"] += uses * forms["torch"]
    print("\nStrided layers of one step, weighted by uses (ms): "
          + ", ".join(f"{name} {ms * 1e3:.0f}" for name, ms in weighted.items())
          + f"; picked / torch {weighted['picked'] / weighted['torch']:.2f}")


if __name__ == "__main__":
    app.run(main)
