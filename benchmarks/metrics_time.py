"""Time of an evaluation with every metric (fid,kid,is,pr,dc,mem) beside FID alone.

  python benchmarks/metrics_time.py                   # 10k x 10k features, 64 images
  python benchmarks/metrics_time.py --count=500 --images=4 --repeats=1   # smoke test
  python benchmarks/metrics_time.py --count=50000 --nonetwork   # 50k x 50k, the math alone

Part 1, the metrics' math on features: `metrics.score` of FID alone, of all metrics and of
each metric alone, on synthetic 2048-d features shaped like Inception pool features
(non-negative, correlated, a decaying spectrum; the fakes' mix differs): `--count` reference
features (the cached subset that KID, pr, dc and mem read) and `--count` fakes with
1008 logits. An untimed first call of all metrics compiles the k-NN functions (as a run's
first evaluation does); then the cases alternate, `--repeats` times, in one process, and the
medians of wall and CPU seconds (time.process_time: every thread's) are shown. The k-NN
distances run on JAX's default device (an accelerator where there is one), the FID and KID
math on the host.

Part 2, the network pass: the FeatureExtractor (2048-d, without and with the logits that the
Inception Score needs) on `--images` uint8 images of `--resolution` (resized to 299x299 inside,
as always), after a compiling call; per-image medians are extrapolated to `--count` fakes (an
evaluation once the reference is cached: the steady state of a run) and to twice that (the
first evaluation, which also computes the reference's features). The weights are random, of
pytorch-fid's layout (tests/helpers.py): the speed does not depend on their values.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings

import numpy as np
from absl import app, flags
from repo_helpers import load_test_helpers

from dcgan_jax import cli
from dcgan_jax.names import EVAL_METRICS

flags.DEFINE_integer("count", 10_000, "Fakes, and reference features, per evaluation.")
flags.DEFINE_integer("dims", 2048, "Feature dimensions (2048: the Inception Score's).")
flags.DEFINE_integer("images", 64, "Images of the timed network pass.")
flags.DEFINE_integer("resolution", 64, "Side of the square RGB images of the network pass.")
flags.DEFINE_integer("repeats", 3, "Timed runs of each case; medians are shown.")
flags.DEFINE_integer("seed", 0, "Seed of the random features and images.")
flags.DEFINE_bool("network", True, "Time the network pass too (Part 2).")
FLAGS = flags.FLAGS

ALL = EVAL_METRICS
CASES = {"FID alone": ("fid",), "fid,kid (the default)": ("fid", "kid"), "all metrics": ALL,
         **{f"{name} alone": (name,) for name in ALL[1:]}}
NUM_LOGITS = 1008


def random_features(count: int, dims: int, seed: int) -> tuple[np.ndarray, ...]:
    """Reference and fake features: |correlated normals| with a decaying spectrum, the fakes'
    mix rescaled; and the fakes' logits, a few classes per image standing out."""
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((dims, dims), dtype=np.float32)
           / np.sqrt(np.arange(1, dims + 1, dtype=np.float32))[:, None])
    real = np.abs(rng.standard_normal((count, dims), dtype=np.float32) @ mix + 0.2)
    mix[: dims // 8] *= 1.2
    fake = np.abs(rng.standard_normal((count, dims), dtype=np.float32) @ mix + 0.2)
    logits = rng.standard_normal((count, NUM_LOGITS), dtype=np.float32)
    logits[np.arange(count), rng.integers(0, NUM_LOGITS, count)] += 8
    return real, fake, logits


def seconds(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return tuple(statistics.median(run[i] for run in runs) for i in (0, 1))


def time_math(count: int, dims: int, repeats: int, seed: int) -> dict[str, tuple]:
    from dcgan_jax.evaluation import metrics
    real, fake, logits = random_features(count, dims, seed)
    # Fewer features than dimensions (the smoke test) only warn that FID is biased.
    warnings.filterwarnings("ignore", "[0-9]+ images for", UserWarning)
    reference = metrics.Statistics.of(real, keep_features=count)

    def score(wanted):
        return metrics.score(wanted, fake, reference, logits)

    first = seconds(lambda: print("  values:", {k: round(v, 4) for k, v in score(ALL).items()}))
    print(f"  first call of all metrics (compiles): {first[0]:.1f} s wall, {first[1]:.1f} s CPU")
    runs = {name: [] for name in CASES}
    for repeat in range(repeats):
        for name, wanted in CASES.items():
            runs[name].append(seconds(lambda wanted=wanted: score(wanted)))
        print(f"  repeat {repeat + 1}: " + ", ".join(
            f"{name} {run[-1][0]:.1f}" for name, run in runs.items()) + " s wall")
    return {name: median(run) for name, run in runs.items()}


def time_network(images: int, resolution: int, repeats: int, seed: int) -> dict[bool, tuple]:
    """Per-image (wall, CPU) seconds of the extractor, without and with logits."""
    from dcgan_jax import parallel
    from dcgan_jax.evaluation import features

    helpers = load_test_helpers()
    batch = np.random.default_rng(seed).integers(
        0, 256, (images, resolution, resolution, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = helpers.random_fid_weights(os.path.join(folder, "inception.npz"))
        extractors = {logits: features.FeatureExtractor(path, 2048, parallel.make_mesh(),
                                                        images, logits)
                      for logits in (False, True)}
    runs = {logits: [] for logits in extractors}
    for logits, extractor in extractors.items():
        first = seconds(lambda e=extractor: e.of_images(batch))
        assert extractor.of_images(batch).shape == (images, extractor.width)
        print(f"  logits={logits}: first call (compiles) {first[0]:.1f} s wall")
    for _ in range(repeats):  # alternating, so that a burst of load slows both alike
        for logits, extractor in extractors.items():
            runs[logits].append(seconds(lambda e=extractor: e.of_images(batch)))
    result = {logits: tuple(s / images for s in median(run)) for logits, run in runs.items()}
    for logits, (wall, cpu) in result.items():
        print(f"  logits={logits}: {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU per image")
    return result


def main(argv):
    del argv
    cli.set_up_process()
    print(f"{FLAGS.count:,} fakes x {FLAGS.count:,} reference features, {FLAGS.dims}-d; "
          f"{FLAGS.images} images of {FLAGS.resolution}x{FLAGS.resolution}x3; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print("Part 1: the metrics' math")
    math = time_math(FLAGS.count, FLAGS.dims, FLAGS.repeats, FLAGS.seed)
    n = FLAGS.count
    fid_alone = math["FID alone"]
    rows = [(f"{name} (math)", *math[name], fid_alone) for name in CASES]
    if not FLAGS.network:
        print_table(rows)
        return
    print("Part 2: the network pass")
    network = time_network(FLAGS.images, FLAGS.resolution, FLAGS.repeats, FLAGS.seed)
    print(f"load {os.getloadavg()[0]:.2f}\n")
    for what, images in ((f"{n:,} fakes", n), (f"{2 * n:,} (+ reference)", 2 * n)):
        for logits in (False, True):
            rows.append((f"network {what}, {'with' if logits else 'no'} logits",
                         *(s * images for s in network[logits]),
                         tuple(s * images for s in network[False])))
    for what, images in (("per evaluation", n), ("first evaluation", 2 * n)):
        alone = tuple(math["FID alone"][i] + network[False][i] * images for i in (0, 1))
        every = tuple(math["all metrics"][i] + network[True][i] * images for i in (0, 1))
        rows.append((f"total {what}: FID alone", *alone, alone))
        rows.append((f"total {what}: all metrics", *every, alone))
    print_table(rows)


def print_table(rows: list[tuple]) -> None:
    print("vs FID alone: against the same part of an evaluation of FID alone (its math, the "
          "network without logits, its total).\n")
    print("| what | wall s | CPU s | vs FID alone |")
    print("| --- | ---: | ---: | ---: |")
    for what, wall, cpu, base in rows:
        print(f"| {what} | {wall:,.2f} | {cpu:,.2f} | {wall / base[0]:.2f}x |")


if __name__ == "__main__":
    app.run(main)
