"""FID and KID from Inception features, computed on the host in float64 (numpy, scipy).

The formulas follow pytorch-fid (FID) and torch-fidelity / clean-fid (KID), so their numbers
and ours can be compared.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings

import numpy as np
from scipy import linalg

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default, so that subsets match its own


class MetricError(ValueError):
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
        return cls(mu=np.mean(features, axis=0), sigma=np.cov(features, rowvar=False),
                   count=len(features), features=kept)

    def save(self, path: str) -> None:
        """An .npz pytorch-fid can read (`mu`, `sigma`), written atomically."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "count": np.int64(self.count)}
        if self.features is not None:
            arrays["features"] = self.features
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz", delete=False) as f:
            np.savez(f, **arrays)
        os.replace(f.name, path)

    @classmethod
    def load(cls, path: str) -> Statistics:
        """Reads ours or pytorch-fid's --save-stats files."""
        try:
            with np.load(path) as f:
                mu, sigma = f["mu"], f["sigma"]
                features = f["features"] if "features" in f.files else None
                count = int(f["count"]) if "count" in f.files else 0
        except (OSError, ValueError, KeyError) as error:
            raise MetricError(f"{path} is not a statistics file with 'mu' and 'sigma' "
                              f"({error})") from None
        return cls(mu=mu, sigma=sigma, count=count, features=features)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64.

    As in pytorch-fid, a singular product is retried with `eps` added to both diagonals.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricError(f"statistics of {mu1.shape[0]}-d and {mu2.shape[0]}-d features "
                          f"cannot be compared; compute both with the same --dims")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"singular covariance product: adding {eps} to the diagonals",
                          stacklevel=3)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricError(f"the square root of the covariance product has an imaginary "
                              f"component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(a: Statistics, b: Statistics) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel (x.y / d + 1)^3."""
    d, m = x.shape[1], x.shape[0]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the MMD over random subsets.

    Subsets of min(subset_size, both counts) are drawn as torch-fidelity draws them.
    """
    size = min(subset_size, len(features1), len(features2))
    if size < 2:
        raise MetricError(f"KID needs at least 2 images on each side; got {len(features1)} "
                          f"and {len(features2)}")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = features1[rng.choice(len(features1), size, replace=False)]
        y = features2[rng.choice(len(features2), size, replace=False)]
        mmds[i] = _polynomial_mmd(x, y)
    return float(np.mean(mmds)), float(np.std(mmds))


def scores(fake_features: np.ndarray, reference: Statistics, kid_subsets: int = KID_SUBSETS,
           kid_subset_size: int = KID_SUBSET_SIZE) -> dict[str, float]:
    """FID, and KID (mean and std) when the reference keeps its features."""
    result = {"fid": fid(Statistics.of(fake_features), reference)}
    if reference.features is not None:
        result["kid"], result["kid_std"] = kid(fake_features, reference.features, kid_subsets,
                                               kid_subset_size)
    return result
