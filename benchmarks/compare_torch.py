"""One DCGAN training step in PyTorch beside dcgan_jax's jitted step, in one process.

  python benchmarks/compare_torch.py --resolutions=64,128 --batch_size=64 --steps=4 --repeats=3

What runs. The PyTorch side is pytorch/examples' dcgan generalised to any power-of-two
resolution with the layer pyramid of `dcgan_jax.models` (widths double as the resolution
halves; the script asserts both frameworks' parameter counts agree): the same N(0, 0.02)
convolution and N(1, 0.02) BatchNorm-scale initialisation, batch size, Adam(2e-4, 0.5,
0.999) for both networks and non-saturating BCE-with-logits losses. A step is one D update on
a real batch and a fake batch (fakes detached), then one G update through D on the same fakes
(as pytorch/examples does). D's weights are frozen while G's loss is backpropagated, so
neither side computes D's weight gradients there (also under torch.compile). Real batches are
random uint8 images already on the device, scaled to [-1, 1] inside the step on both sides;
the latents are drawn inside the step on both sides.

How it is timed. After warm-up (the JAX step is compiled ahead of time, and that compile is
reported separately), `--repeats` rounds each run a block of `--steps` PyTorch steps and a
block of `--steps` JAX steps, alternating which block goes first. The host waits for the
device only at the end of a block (`torch.cuda.synchronize`, `jax.block_until_ready`), never
inside it. Images/s is the median over rounds.

How FLOPs are counted (analytic, per image, a multiply-add = 2 FLOPs). A Conv2d producing an
Ho x Wo map costs Ho * Wo * k * k * Cin * Cout multiply-adds; a ConvTranspose2d reading an
Hi x Wi map costs Hi * Wi * k * k * Cin * Cout (it is the transpose of the convolution that
maps its output back to its input, so it costs the same). Padding taps count, as frameworks
compute them. Per layer, the backward pass costs one forward for the weight gradient and one
for the input gradient; the input gradient of a network's first layer is skipped where nothing
needs it (D's input during D's update, G's latent input). BatchNorm, activations, losses and
Adam are left out (well under 1%). With fwd(N) the forward multiply-adds of network N and
first(N) those of its first layer, one step is

  D update, real and fake:   2 * (fwd(D) + fwd(D) + fwd(D) - first(D))
  G forward and backward:    fwd(G) + fwd(G) + fwd(G) - first(G)
  D for G's loss:            fwd(D) + fwd(D)            (input gradients only)

multiply-adds, i.e. about 2.27 GFLOP per image at 64x64 and 12.0 at 128x128 (9 fwd(D) + 3
fwd(G), 2.50 and 13.2, if every layer also took both gradients). XLA's own count of the
compiled step (`cost_analysis()['flops']`) is printed beside it as a rough cross-check: it
adds the elementwise work but leaves out taps that fall on padding (6% of those of D's
32x32 -> 16x16 layer, 23% of its 8x8 -> 4x4 one), counts the body of a loop once (the
chunked kernel gradients on CPUs), and on GPUs leaves out cuDNN's convolutions altogether
(printed as n/a there).

Achieved FLOP/s are the analytic FLOPs times images/s, also given as a fraction of the peak
of a large matrix multiply measured here with torch, before and after the timed steps (the
better of both, in case other work shared the machine): float32 on a CPU, whatever the compute
dtype (CPUs without native bfloat16 arithmetic convert it to float32); on CUDA, in each
side's compute dtype (float32 with TF32 allowed, as both frameworks use TF32 for float32
convolutions by default there, or bfloat16).

The JAX config (`jax_step.py`) has only the fields `dcgan_jax.step` reads, so only jax,
flax, optax, absl and torch are needed: no ml_collections, clu, grain or TensorFlow.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
import torch
from absl import app, flags
from torch import nn

from dcgan_jax import cli
from dcgan_jax.models import num_blocks

from jax_step import (
    BETAS,
    CHANNELS,
    LR,
    NDF,
    NGF,
    NZ,
    SEED,
    compiled_step,
    cpu_description,
    jax_config,
    run_steps,
)

flags.DEFINE_list("resolutions", ["64", "128"], "Resolutions to time.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("steps", 5, "Steps per timed block.")
flags.DEFINE_integer("repeats", 3, "Timed rounds of one PyTorch block and one JAX block.")
flags.DEFINE_integer("warmup", 2, "Untimed PyTorch steps, and JAX steps after compiling.")
flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "Where both frameworks run.")
flags.DEFINE_boolean("torch_channels_last", False, "PyTorch models and batches in NHWC.")
flags.DEFINE_boolean("torch_autocast_bf16", False, "PyTorch forward passes under bf16 autocast.")
flags.DEFINE_boolean("torch_compile", False, "torch.compile both PyTorch networks.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "JAX compute dtype (config.dtype).")
flags.DEFINE_integer("threads", 0, "torch.set_num_threads; 0: every core this process may "
                     "use (as XLA's CPU client always does).")
FLAGS = flags.FLAGS

def torch_generator(resolution: int) -> nn.Sequential:
    """pytorch/examples' netG with one stride-2 block per doubling from 4x4."""
    width = NGF * 2 ** (num_blocks(resolution) - 1)
    layers: list[nn.Module] = [nn.ConvTranspose2d(NZ, width, 4, 1, 0, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU(True)]
    for _ in range(num_blocks(resolution) - 1):
        layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                   nn.BatchNorm2d(width // 2), nn.ReLU(True)]
        width //= 2
    layers += [nn.ConvTranspose2d(width, CHANNELS, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def torch_discriminator(resolution: int) -> nn.Sequential:
    """pytorch/examples' netD with one stride-2 block per halving down to 4x4 (logits out)."""
    width = NDF
    layers: list[nn.Module] = [nn.Conv2d(CHANNELS, width, 4, 2, 1, bias=False),
                               nn.LeakyReLU(0.2, inplace=True)]
    for _ in range(num_blocks(resolution) - 1):
        layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                   nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2, inplace=True)]
        width *= 2
    layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False), nn.Flatten(0)]
    return nn.Sequential(*layers)


def dcgan_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def conv_macs(network: nn.Sequential, size: int) -> list[int]:
    """Forward multiply-adds per image of each (transposed) convolution, input `size`^2."""
    macs = []
    for layer in network:
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            (k, _), (s, _), (p, _) = layer.kernel_size, layer.stride, layer.padding
            taps = k * k * layer.in_channels * layer.out_channels
            if isinstance(layer, nn.ConvTranspose2d):
                macs.append(size * size * taps)
                size = (size - 1) * s - 2 * p + k
            else:
                size = (size + 2 * p - k) // s + 1
                macs.append(size * size * taps)
    return macs


def step_flops(generator: nn.Sequential, discriminator: nn.Sequential,
               resolution: int) -> float:
    """Analytic FLOPs of one train step per image (see the module docstring)."""
    g, d = conv_macs(generator, 1), conv_macs(discriminator, resolution)
    fwd_g, fwd_d = sum(g), sum(d)
    d_update = 2 * (3 * fwd_d - d[0])
    g_update = 3 * fwd_g - g[0]
    d_for_g = 2 * fwd_d
    return 2.0 * (d_update + g_update + d_for_g)


class TorchDCGAN:
    """Both networks, their optimizers and pytorch/examples' train step."""

    def __init__(self, resolution: int, batch_size: int, device: torch.device,
                 channels_last: bool, autocast_bf16: bool, compile_networks: bool) -> None:
        torch.manual_seed(SEED)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch_generator(resolution).to(device, memory_format=memory_format)
        self.discriminator = torch_discriminator(resolution).to(device,
                                                                memory_format=memory_format)
        self.generator.apply(dcgan_init)
        self.discriminator.apply(dcgan_init)
        if compile_networks:
            self.generator, self.discriminator = (
                torch.compile(self.generator), torch.compile(self.discriminator))
        self.g_opt = torch.optim.Adam(self.generator.parameters(), lr=LR, betas=BETAS)
        self.d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=LR, betas=BETAS)
        self.criterion = nn.BCEWithLogitsLoss()
        self.ones = torch.ones(batch_size, device=device)
        self.zeros = torch.zeros(batch_size, device=device)
        self.batch_size, self.device, self.memory_format = batch_size, device, memory_format
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=autocast_bf16)

    def step(self, real_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One D update on real and detached fake images, then one G update on the fakes."""
        real = (real_u8.float() / 127.5 - 1.0).contiguous(memory_format=self.memory_format)
        self.d_opt.zero_grad()
        with self.autocast:
            loss_real = self.criterion(self.discriminator(real), self.ones)
        loss_real.backward()
        z = torch.randn(self.batch_size, NZ, 1, 1, device=self.device)
        with self.autocast:
            fake = self.generator(z)
            loss_fake = self.criterion(self.discriminator(fake.detach()), self.zeros)
        loss_fake.backward()
        self.d_opt.step()

        self.g_opt.zero_grad()
        self.discriminator.requires_grad_(False)
        with self.autocast:
            loss_g = self.criterion(self.discriminator(fake), self.ones)
        loss_g.backward()
        self.discriminator.requires_grad_(True)
        self.g_opt.step()
        return loss_real + loss_fake, loss_g


def parameter_count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def torch_parameter_count(module: nn.Module) -> int:
    """Trainable weights and BatchNorm scales and biases, as Flax's `params` hold them."""
    return sum(p.numel() for p in module.parameters())


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of a square torch matmul (2048 on a CPU, 8192 on a GPU) over 5 runs."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def torch_dtype() -> str:
    return "bfloat16" if FLAGS.torch_autocast_bf16 else "float32"


def peak_dtype(device: torch.device, dtype: str) -> str:
    """The matmul dtype whose peak a compute dtype is compared with (see the docstring)."""
    return dtype if device.type == "cuda" else "float32"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(block: Callable[[], None]) -> float:
    start = time.perf_counter()
    block()
    return time.perf_counter() - start


def compare(resolution: int, device: torch.device) -> dict[str, float]:
    """Compile time, images/s and FLOP/s of both sides at one resolution."""
    b, steps = FLAGS.batch_size, FLAGS.steps
    rng = np.random.default_rng(SEED)
    model = TorchDCGAN(resolution, b, device, FLAGS.torch_channels_last,
                       FLAGS.torch_autocast_bf16, FLAGS.torch_compile)
    real_torch = torch.from_numpy(
        rng.integers(0, 256, (b, CHANNELS, resolution, resolution), dtype=np.uint8)).to(device)

    compiled, state, real_jax, compile_s = compiled_step(jax_config(resolution, b, FLAGS.dtype))
    for name, jax_params, torch_model in (
            ("G", state.g.params, model.generator), ("D", state.d.params, model.discriminator)):
        counts = parameter_count(jax_params), torch_parameter_count(torch_model)
        assert counts[0] == counts[1], f"{name} at {resolution}: JAX {counts[0]:,} " \
                                       f"!= PyTorch {counts[1]:,} parameters"
    xla_flops = compiled.cost_analysis()["flops"] / b

    def torch_block(n: int) -> None:
        for _ in range(n):
            model.step(real_torch)
        synchronize(device)

    def jax_block(n: int) -> None:
        nonlocal state
        state = run_steps(compiled, state, real_jax, n)

    torch_block(FLAGS.warmup)
    jax_block(FLAGS.warmup)
    rates: dict[str, list[float]] = {"torch": [], "jax": []}
    blocks = {"torch": torch_block, "jax": jax_block}
    for i in range(FLAGS.repeats):
        for side in (("torch", "jax") if i % 2 == 0 else ("jax", "torch")):
            rates[side].append(steps * b / timed(functools.partial(blocks[side], steps)))
        print(f"  {resolution}x{resolution} round {i + 1}/{FLAGS.repeats}: torch "
              f"{rates['torch'][-1]:.1f} images/s, JAX {rates['jax'][-1]:.1f} images/s "
              f"(load average {os.getloadavg()[0]:.1f})", flush=True)

    # torch.compile wraps the networks; their layers are those of the wrapped modules.
    flops = step_flops(*(getattr(network, "_orig_mod", network)
                         for network in (model.generator, model.discriminator)), resolution)
    torch_rate, jax_rate = (statistics.median(rates[side]) for side in ("torch", "jax"))
    return {"compile_s": compile_s, "torch": torch_rate, "jax": jax_rate, "flops": flops,
            "xla_flops": xla_flops, "torch_flops_s": flops * torch_rate,
            "jax_flops_s": flops * jax_rate}


def xla_gflops(row: dict[str, float], device: torch.device) -> str:
    """XLA's FLOP count per image; on CUDA it leaves out cuDNN's convolutions, so n/a."""
    return "n/a" if device.type == "cuda" else f"{row['xla_flops'] / 1e9:.2f}"


def main(argv: list[str]) -> None:
    del argv
    cli.set_up_process()
    cli.quiet_logs()  # no library INFO lines (a missing libtpu, orbax saves)
    if FLAGS.device == "cuda":
        # Both frameworks share the GPU: JAX would otherwise take 75% of it up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    jax.config.update("jax_platforms", FLAGS.device)
    device = torch.device(FLAGS.device)
    torch.set_num_threads(FLAGS.threads or len(os.sched_getaffinity(0)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    peak_dtypes = sorted({peak_dtype(device, torch_dtype()), peak_dtype(device, FLAGS.dtype)})
    peaks = {name: matmul_peak(device, getattr(torch, name)) for name in peak_dtypes}
    torch_desc = " ".join([torch_dtype()] + ["channels_last"] * FLAGS.torch_channels_last
                          + ["torch.compile"] * FLAGS.torch_compile)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else cpu_description())
    print(f"device: {machine}; jax {jax.__version__} ({jax.device_count()} x "
          f"{jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"(threads={torch.get_num_threads()}, {torch_desc})")
    print(f"batch {FLAGS.batch_size}; {FLAGS.repeats} rounds of {FLAGS.steps} steps per side, "
          f"median images/s")

    rows = [(int(r), compare(int(r), device)) for r in FLAGS.resolutions]
    # Measured again at the end, the best of both, in case other work shared the machine.
    for name in peak_dtypes:
        peaks[name] = max(peaks[name], matmul_peak(device, getattr(torch, name)))
        tf32 = " (TF32 allowed)" if device.type == "cuda" and name == "float32" else ""
        print(f"matmul peak, torch {name}{tf32}: {peaks[name] / 1e9:,.0f} GFLOP/s")
    for _, row in rows:
        row["torch_peak"] = row["torch_flops_s"] / peaks[peak_dtype(device, torch_dtype())]
        row["jax_peak"] = row["jax_flops_s"] / peaks[peak_dtype(device, FLAGS.dtype)]
    header = ("| res | batch | JAX dtype | JAX compile s | torch steps/s | JAX steps/s "
              "| torch img/s | JAX img/s | JAX/torch "
              "| GFLOP/img | XLA GFLOP/img | torch GFLOP/s | JAX GFLOP/s "
              "| torch % peak | JAX % peak |")
    print()
    print(header)
    print("|" + "|".join("---:" for _ in range(header.count("|") - 1)) + "|")
    for res, row in rows:
        print(f"| {res} | {FLAGS.batch_size} | {FLAGS.dtype} | {row['compile_s']:.1f} "
              f"| {row['torch'] / FLAGS.batch_size:.2f} | {row['jax'] / FLAGS.batch_size:.2f} "
              f"| {row['torch']:.1f} "
              f"| {row['jax']:.1f} | {row['jax'] / row['torch']:.2f} "
              f"| {row['flops'] / 1e9:.2f} | {xla_gflops(row, device)} "
              f"| {row['torch_flops_s'] / 1e9:.1f} | {row['jax_flops_s'] / 1e9:.1f} "
              f"| {100 * row['torch_peak']:.1f} | {100 * row['jax_peak']:.1f} |")


if __name__ == "__main__":
    app.run(main)
