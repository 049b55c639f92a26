"""FID and KID from Inception features, computed on the host with numpy.

The formulas follow pytorch-fid (FID) and torch-fidelity / clean-fid (KID), so their numbers
and ours can be compared; the linear algebra differs where theirs is slow or inexact
(benchmarks/fid_host_math.py times both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Sequence

import numpy as np

from dcgan_jax import paths
from dcgan_jax.errors import UserFacingError

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default, so that subsets match its own


# The names of evaluation values in progress lines, in the order they are shown.
METRIC_LABELS = {"fid": "FID", "kid": "KID", "is": "IS", "precision": "precision",
                 "recall": "recall", "density": "density", "coverage": "coverage",
                 "memorisation": "memorisation"}


def format_value(name: str, value: float) -> str:
    """An evaluation value as progress lines and `evaluate` show it."""
    return f"{value:.3f}" if name == "fid" else f"{value:.5f}" if name == "kid" else f"{value:.4f}"


def evaluation_text(values: dict[str, float], decimals: int | None = None) -> str:
    """`FID 31.234 KID 0.01234 ± 0.00100 IS 2.3456 ± 0.0123 ...`: the values present, as
    progress lines show them, or all with `decimals` (as `evaluate` prints them)."""

    def shown(name: str, value: float) -> str:
        return format_value(name, value) if decimals is None else f"{value:.{decimals}f}"

    return " ".join(
        f"{label} {shown(name, values[name])}"
        + (f" ± {shown(name, values[name + '_std'])}" if name + "_std" in values else "")
        for name, label in METRIC_LABELS.items() if name in values)



class MetricError(UserFacingError, ValueError):
    """Too few images, or statistics that do not match."""


@dataclasses.dataclass
class Statistics:
    """Mean and covariance of features (pytorch-fid's `mu`, `sigma`), and the features
    themselves (a subset of them) when KID is wanted."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: np.ndarray | None = None

    @classmethod
    def of(cls, features: np.ndarray, keep_features: int | None = None) -> Statistics:
        if len(features) < 2:
            raise MetricError(f"FID needs at least 2 images; got {len(features)}")
        if len(features) < features.shape[1]:
            warnings.warn(
                f"{len(features)} images for {features.shape[1]}-d features: the covariance "
                f"is singular and FID is biased high; use at least {features.shape[1]} "
                f"images (10,000 or more to compare with published numbers)", stacklevel=2)
        kept = features if keep_features is None else features[:keep_features]
        with bounded_blas():
            return cls(mu=np.mean(features, axis=0), sigma=np.cov(features, rowvar=False),
                       count=len(features), features=kept)

    def save(self, path: str) -> None:
        """An .npz pytorch-fid can read (`mu`, `sigma`), written atomically (on a disk or in
        a bucket)."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "count": np.int64(self.count)}
        if self.features is not None:
            arrays["features"] = self.features
        with paths.atomic_write(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str) -> Statistics:
        """Reads ours or pytorch-fid's --save-stats files."""
        try:
            with paths.open_file(path) as file, np.load(file) as f:
                mu, sigma = f["mu"], f["sigma"]
                features = f["features"] if "features" in f.files else None
                count = int(f["count"]) if "count" in f.files else 0
        except (OSError, ValueError, KeyError) as error:
            raise MetricError(f"{path} is not a statistics file with 'mu' and 'sigma' "
                              f"({error})") from None
        return cls(mu=mu, sigma=sigma, count=count, features=features)


def _check_semidefinite(eigenvalues: np.ndarray, what: str) -> None:
    """Rounding leaves eigenvalues of a covariance slightly below 0; more means that the input
    is not one (pytorch-fid stops there on an imaginary component of the square root)."""
    largest = max(float(eigenvalues.max()), 0.0)
    if eigenvalues.min() < -1e-4 * largest:
        raise MetricError(f"{what} is not positive semi-definite: eigenvalue "
                          f"{eigenvalues.min():.3g}, largest {largest:.3g}")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64.

    With sigma1 = C^T C, C = diag(sqrt(l)) V^T from sigma1's eigendecomposition, sigma1 sigma2
    has the eigenvalues of the symmetric semi-definite C sigma2 C^T, so the trace of its square
    root is the sum of their square roots. Two symmetric eigendecompositions are several times
    faster than pytorch-fid's `sqrtm` of the product, and need no offset when the product is
    singular (fewer images than dimensions): there `sqrtm` may fail, and pytorch-fid retries
    with 1e-6 added to both diagonals, which moves FID by up to 1e-4 relative.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricError(f"statistics of {mu1.shape[0]}-d and {mu2.shape[0]}-d features "
                          f"cannot be compared; compute both with the same --dims")
    with bounded_blas():
        values, vectors = np.linalg.eigh(sigma1)
        _check_semidefinite(values, "sigma1")
        root = np.sqrt(np.clip(values, 0, None))
        product = root[:, None] * (vectors.T @ sigma2 @ vectors) * root
        product_values = np.linalg.eigvalsh(product)
    _check_semidefinite(product_values, "sigma2")
    trace_sqrt = np.sqrt(np.clip(product_values, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid(a: Statistics, b: Statistics) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _kernel_sums(gram: np.ndarray, dims: int) -> tuple[float, float]:
    """Sum and trace of the kernel (g / d + 1)^3 of a Gram matrix, overwritten in place.

    Entries stay in the features' precision, sums are float64: the MMD is a small difference of
    large sums, which float32 sums of a million entries leave off by 1e-5 of it or more.
    """
    gram /= dims
    gram += 1
    cube = gram * gram
    cube *= gram
    return float(cube.sum(dtype=np.float64)), float(np.trace(cube, dtype=np.float64))


def _polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel (x.y / d + 1)^3. `x @ x.T` is one symmetric BLAS
    product (numpy calls syrk), half the work of `x @ y.T`."""
    m, d = x.shape
    xx_sum, xx_trace = _kernel_sums(x @ x.T, d)
    yy_sum, yy_trace = _kernel_sums(y @ y.T, d)
    xy_sum, _ = _kernel_sums(x @ y.T, d)
    return (xx_sum - xx_trace + yy_sum - yy_trace) / (m * (m - 1)) - 2 * xy_sum / (m * m)


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the MMD over random subsets.

    Subsets of min(subset_size, both counts) are drawn as torch-fidelity draws them. Products
    are in float32 unless a side is float64, as torch-fidelity's are for float32 features.
    """
    size = min(subset_size, len(features1), len(features2))
    if size < 2:
        raise MetricError(f"KID needs at least 2 images on each side; got {len(features1)} "
                          f"and {len(features2)}")
    dtype = np.result_type(features1, features2, np.float32)
    features1, features2 = np.asarray(features1, dtype), np.asarray(features2, dtype)
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    with bounded_blas():
        for i in range(subsets):
            x = features1[rng.choice(len(features1), size, replace=False)]
            y = features2[rng.choice(len(features2), size, replace=False)]
            mmds[i] = _polynomial_mmd(x, y)
    return float(np.mean(mmds)), float(np.std(mmds))


def bounded_blas() -> contextlib.AbstractContextManager:
    """BLAS on half the cores this process may run on (at least one) while the host math
    runs: with a thread per core, BLAS's spinning threads and other work on those cores (the
    input pipeline's workers, another process) slow each other down many times over."""
    from threadpoolctl import threadpool_limits
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return threadpool_limits(limits=max(1, cores // 2), user_api="blas")


def score(wanted: Sequence[str], fake: np.ndarray, reference: Statistics,
          fake_logits: np.ndarray | None = None, kid_subsets: int = KID_SUBSETS,
          kid_subset_size: int = KID_SUBSET_SIZE) -> dict[str, float]:
    """The values of the metrics `wanted` (names.METRIC_VALUES) of generated images'
    features `fake` (and classifier logits, for the Inception Score) against `reference`.

    FID uses the reference's statistics; KID, precision/recall, density/coverage and the
    memorisation check its kept features (a fixed subset of the dataset's, as cached).
    """
    from dcgan_jax.evaluation import quality
    result: dict[str, float] = {}
    if reference.features is None and {"kid", "pr", "dc", "mem"} & set(wanted):
        raise MetricError("the reference statistics keep no features: only FID can be "
                          "computed against them (drop kid, pr, dc and mem from the metrics)")
    if "fid" in wanted:
        result["fid"] = fid(Statistics.of(fake), reference)
    if "kid" in wanted:
        result["kid"], result["kid_std"] = kid(fake, reference.features, kid_subsets,
                                               kid_subset_size)
    if "is" in wanted:
        if fake_logits is None:
            raise MetricError("the Inception Score needs the classifier's logits: compute "
                              "the features with logits (eval.dims=2048)")
        result["is"], result["is_std"] = quality.inception_score(fake_logits)
    if "pr" in wanted:
        values = quality.prdc(reference.features, fake)
        result.update({name: values[name] for name in ("precision", "recall")})
        if "dc" in wanted:
            result.update({name: values[name] for name in ("density", "coverage")})
    elif "dc" in wanted:
        result["density"], result["coverage"] = quality.density_coverage(reference.features,
                                                                         fake)
    if "mem" in wanted:
        result["memorisation"], _ = quality.memorisation_fraction(fake, reference.features)
    return result
