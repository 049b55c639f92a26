"""A plain tutorial class-conditional DCGAN in PyTorch: the peer of the conditional demo.

  python benchmarks/torch_cdcgan.py --steps=2500 --out=/tmp/torch_cdcgan.npz
  python benchmarks/small_data.py --samples=torch=/tmp/torch_cdcgan.npz

The textbook conditioning, to judge dcgan_jax's (`configs/mnist_cond.py`) against: G reads
z (100) joined with the one-hot class (10) as a 1x1 map, through ConvTranspose / BatchNorm /
ReLU blocks of ngf = 32 (4x4x128, 8x8x64, 16x16x32) to a 32x32x1 tanh image; D reads the
image joined with ten one-hot label maps (32x32x11), through Conv / BatchNorm / LeakyReLU(0.2)
blocks of ndf = 32 (no BatchNorm on the first, as DCGAN) to one logit. As pytorch/examples'
dcgan: N(0, 0.02) convolutions and N(1, 0.02) BatchNorm scales, Adam(2e-4, 0.5, 0.999) for
both, non-saturating BCE; a step updates D on a real batch with its labels and a fake batch
of uniformly drawn labels (detached), then G through D on the same fakes.

Data: the 5,000 demo digits (`demo:mnist`) with their labels, scaled to 32x32 by
`dcgan_jax.data.preprocess` as the demo's pipeline does; batch 32, reshuffled every epoch,
the last partial batch dropped (156 steps an epoch, as the demo's). At the end G (in
inference mode: BatchNorm's running averages) writes --num_samples class-balanced digits,
digit i of class i mod 10, to --out (`images` uint8 [N, 32, 32, 1], `labels` int32 [N],
`dataset` "demo:mnist"), which `small_data.py --samples` scores. PyTorch is a reference
peer: only the benchmarks and tests import it, never dcgan_jax.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from absl import app, flags
from torch import nn

from dcgan_jax import data

flags.DEFINE_integer("steps", 2500, "Training steps (the demo: 16 epochs of 156 steps).")
flags.DEFINE_integer("batch_size", 32, "Real (and fake) digits per step.")
flags.DEFINE_integer("seed", 0, "Seed of the initialisation, the order and the latents.")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads.")
flags.DEFINE_integer("num_samples", 2000, "Class-balanced digits written to --out.")
flags.DEFINE_string("out", "/tmp/torch_cdcgan.npz", "Where the samples go (.npz).")
flags.DEFINE_integer("log_every", 250, "Steps between loss lines.")
FLAGS = flags.FLAGS

DATASET = "demo:mnist"
RESOLUTION = 32
NUM_CLASSES = 10
NZ = 100
NGF = 32
NDF = 32


def generator() -> nn.Sequential:
    """z and the one-hot class as a [NZ + 10, 1, 1] map to a [1, 32, 32] image in [-1, 1]."""
    return nn.Sequential(
        nn.ConvTranspose2d(NZ + NUM_CLASSES, NGF * 4, 4, 1, 0, bias=False),
        nn.BatchNorm2d(NGF * 4), nn.ReLU(True),
        nn.ConvTranspose2d(NGF * 4, NGF * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(NGF * 2), nn.ReLU(True),
        nn.ConvTranspose2d(NGF * 2, NGF, 4, 2, 1, bias=False),
        nn.BatchNorm2d(NGF), nn.ReLU(True),
        nn.ConvTranspose2d(NGF, 1, 4, 2, 1, bias=False), nn.Tanh())


def discriminator() -> nn.Sequential:
    """A [1 + 10, 32, 32] image with its label maps to one logit."""
    return nn.Sequential(
        nn.Conv2d(1 + NUM_CLASSES, NDF, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
        nn.Conv2d(NDF, NDF * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(NDF * 2), nn.LeakyReLU(0.2, True),
        nn.Conv2d(NDF * 2, NDF * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(NDF * 4), nn.LeakyReLU(0.2, True),
        nn.Conv2d(NDF * 4, 1, 4, 1, 0, bias=False), nn.Flatten(0))


def dcgan_init(module: nn.Module) -> None:
    """pytorch/examples' dcgan initialisation."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def demo_digits() -> tuple[np.ndarray, np.ndarray]:
    """The demo's digits as the training pipeline makes them, uint8 [5000, 32, 32, 1], and
    their labels."""
    records = list(data.open_source(DATASET))
    digits = np.stack([data.preprocess(r["image"], RESOLUTION, 1, "center") for r in records])
    return digits, np.array([r["label"] for r in records], np.int64)


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.one_hot(labels, NUM_CLASSES).float()


def generate(g: nn.Module, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return g(torch.cat([z, one_hot(labels)], 1)[..., None, None])


def discriminate(d: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    maps = one_hot(labels)[..., None, None].expand(-1, -1, RESOLUTION, RESOLUTION)
    return d(torch.cat([x, maps], 1))


def batches(count: int, batch_size: int, rng: np.random.Generator):
    """Index batches over reshuffled epochs, without end."""
    while True:
        order = rng.permutation(count)
        for start in range(0, count - batch_size + 1, batch_size):
            yield torch.from_numpy(order[start:start + batch_size])


def write_samples(g: nn.Module, path: str, count: int, seed: int) -> None:
    """`count` digits of G in inference mode, digit i asked to be of class i mod 10."""
    g.eval()
    labels = torch.arange(count) % NUM_CLASSES
    z = torch.randn(count, NZ, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fake = torch.cat([generate(g, z[i:i + 500], labels[i:i + 500])
                          for i in range(0, count, 500)])
    digits = ((fake + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, images=digits.permute(0, 2, 3, 1).numpy(),
             labels=labels.numpy().astype(np.int32), dataset=DATASET)


def main(argv: list[str]) -> None:
    del argv
    torch.set_num_threads(FLAGS.threads)
    torch.manual_seed(FLAGS.seed)
    digits, labels = demo_digits()
    real_all = torch.from_numpy(digits).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    labels_all = torch.from_numpy(labels)

    g, d = generator(), discriminator()
    g.apply(dcgan_init)
    d.apply(dcgan_init)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    batch = FLAGS.batch_size
    ones, zeros = torch.ones(batch), torch.zeros(batch)

    order = batches(len(digits), batch, np.random.default_rng(FLAGS.seed))
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(1, FLAGS.steps + 1):
        idx = next(order)
        real, real_labels = real_all[idx], labels_all[idx]
        fake_labels = torch.randint(0, NUM_CLASSES, (batch,))
        fake = generate(g, torch.randn(batch, NZ), fake_labels)

        opt_d.zero_grad(set_to_none=True)
        loss_d = (bce(discriminate(d, real, real_labels), ones)
                  + bce(discriminate(d, fake.detach(), fake_labels), zeros))
        loss_d.backward()
        opt_d.step()

        opt_g.zero_grad(set_to_none=True)
        loss_g = bce(discriminate(d, fake, fake_labels), ones)
        loss_g.backward()
        opt_g.step()
        if step % FLAGS.log_every == 0 or step == FLAGS.steps:
            print(f"step {step}: loss_d {loss_d.item():.3f}, loss_g {loss_g.item():.3f}",
                  flush=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    write_samples(g, FLAGS.out, FLAGS.num_samples, FLAGS.seed)
    print(f"trained {FLAGS.steps} steps of batch {batch} ({FLAGS.threads} threads) in "
          f"{wall:.1f} s wall, {cpu:.1f} s CPU: {1000 * wall / FLAGS.steps:.1f} ms wall, "
          f"{1000 * cpu / FLAGS.steps:.1f} ms CPU per step")
    print(f"wrote {FLAGS.num_samples} class-balanced digits to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
