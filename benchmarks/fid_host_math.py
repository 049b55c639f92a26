"""Wall and CPU seconds of the host math of FID and KID, before and after the eigen form.

  python benchmarks/fid_host_math.py --count=10000 --dims=2048

Features are random float32 (like the extractor's): non-negative, correlated, with a
decaying spectrum, and the two sets differ. "before" is the math of metrics.py as it was:
scipy's `sqrtm` of the covariance product (pytorch-fid's method) and KID with float32
sums; "after" is metrics.py now (Statistics.of, np.cov in float64, is unchanged). The
relative difference compares their values. Run it on an idle machine: the load averages
printed before and after show whether it was; on a busy one, OpenBLAS's threaded LAPACK
calls (sqrtm, eigh) slow down ten-fold.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
from absl import app, flags
from scipy import linalg

from dcgan_jax.evaluation import metrics

flags.DEFINE_integer("count", 10_000, "Features per set.")
flags.DEFINE_integer("dims", 2048, "Feature dimensions.")
flags.DEFINE_integer("kid_subsets", metrics.KID_SUBSETS, "KID subsets.")
flags.DEFINE_integer("kid_subset_size", metrics.KID_SUBSET_SIZE, "KID subset size.")
flags.DEFINE_integer("repeats", 3, "Runs of each; the fastest is reported.")
flags.DEFINE_integer("seed", 0, "Seed of the random features.")
FLAGS = flags.FLAGS


def random_features(count: int, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two sets of ReLU'd mixtures of Gaussians; the second has a shifted, rescaled mix."""
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((dims, dims), dtype=np.float32)
           / np.sqrt(np.arange(1, dims + 1, dtype=np.float32))[:, None])
    real = np.maximum(rng.standard_normal((count, dims), dtype=np.float32) @ mix + 0.3, 0)
    mix[: dims // 8] *= 1.2
    fake = np.maximum(rng.standard_normal((count, dims), dtype=np.float32) @ mix + 0.25, 0)
    return real, fake


def before_frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                            sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """metrics.frechet_distance before the eigen form: scipy's sqrtm, with pytorch-fid's retry."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(covmean).real)


def before_kid(features1: np.ndarray, features2: np.ndarray, subsets: int, subset_size: int,
               seed: int = metrics.KID_SEED) -> float:
    """metrics.kid before: whole kernel matrices in the features' dtype, summed in it."""
    size = min(subset_size, len(features1), len(features2))
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = features1[rng.choice(len(features1), size, replace=False)]
        y = features2[rng.choice(len(features2), size, replace=False)]
        d, m = x.shape[1], x.shape[0]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmds[i] = within - 2 * k_xy.sum() / (m * m)
    return float(np.mean(mmds))


def before_statistics(features: np.ndarray) -> metrics.Statistics:
    """metrics.Statistics.of before (and after)."""
    return metrics.Statistics(mu=np.mean(features, axis=0), sigma=np.cov(features, rowvar=False),
                              count=len(features))


STEPS = ("Statistics.of", "FID", "KID")


def measure(methods: dict[str, dict], repeats: int) -> dict[tuple[str, str], tuple]:
    """{(method, step): (value, (wall s, CPU s))}, from the fastest of `repeats` runs; sigma is
    the value of Statistics.of. Methods alternate step by step, so that a burst of load from
    elsewhere slows one run, not one method. CPU seconds are the process's, BLAS threads
    included."""
    best, stats = {}, {}
    for _ in range(repeats):
        for step in STEPS:
            for method, functions in methods.items():
                wall, cpu = time.perf_counter(), time.process_time()
                value = functions[step](stats.get(method))
                seconds = (time.perf_counter() - wall, time.process_time() - cpu)
                if step == "Statistics.of":
                    stats[method], value = value, value.sigma
                if (method, step) not in best or seconds[0] < best[method, step][1][0]:
                    best[method, step] = (value, seconds)
    return best


def main(argv):
    del argv
    print(f"{FLAGS.count} x {FLAGS.dims} float32 features, KID {FLAGS.kid_subsets} subsets of "
          f"{FLAGS.kid_subset_size}; numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, "
          f"load {os.getloadavg()[0]:.2f}")
    real, fake = random_features(FLAGS.count, FLAGS.dims, FLAGS.seed)
    ref = metrics.Statistics.of(real)
    kid_args = (fake, real, FLAGS.kid_subsets, FLAGS.kid_subset_size)
    rows = measure({
        "before": {
            "Statistics.of": lambda _: before_statistics(fake),
            "FID": lambda s: before_frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma),
            "KID": lambda _: before_kid(*kid_args),
        },
        "after": {
            "Statistics.of": lambda _: metrics.Statistics.of(fake),
            "FID": lambda s: metrics.fid(s, ref),
            "KID": lambda _: metrics.kid(*kid_args)[0],
        },
    }, FLAGS.repeats)

    header = (f"{'':14} {'before wall':>11} {'cpu':>7} {'after wall':>11} {'cpu':>7} "
              f"{'speed-up':>8} {'before value':>14} {'after value':>14} {'rel diff':>9}")
    print(header)
    print("-" * len(header))
    totals = np.zeros(4)
    for step in STEPS:
        (old, old_seconds), (new, new_seconds) = rows["before", step], rows["after", step]
        seconds = (*old_seconds, *new_seconds)
        totals += seconds
        diff = np.max(np.abs(np.asarray(new) - old)) / np.max(np.abs(old))
        values = (f"{'(sigma)':>14} {'':>14}" if step == "Statistics.of"
                  else f"{old:>14.8g} {new:>14.8g}")
        print(f"{step:14} {seconds[0]:>11.2f} {seconds[1]:>7.2f} {seconds[2]:>11.2f} "
              f"{seconds[3]:>7.2f} {seconds[0] / seconds[2]:>7.1f}x {values} {diff:>9.1e}")
    print(f"{'total':14} {totals[0]:>11.2f} {totals[1]:>7.2f} {totals[2]:>11.2f} "
          f"{totals[3]:>7.2f} {totals[0] / totals[2]:>7.1f}x")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    app.run(main)
