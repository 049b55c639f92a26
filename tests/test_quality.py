"""Inception Score, precision/recall/density/coverage and memorisation against torch-fidelity
and prdc (test-only dependencies), on fixed random logits and features."""

import contextlib
import io

import numpy as np
import pytest

from dcgan_jax.evaluation import quality
from dcgan_jax.evaluation.metrics import MetricError


def features(count, dims, seed, shift=0.0, scale=1.0):
    """Non-negative features far from 0, as Inception's pool features are, near an 8-d
    subspace shared by all seeds (so that real and fake sets overlap)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(1234).normal(size=(8, dims))
    latent = rng.normal(size=(count, 8)) * scale + shift
    noise = rng.normal(size=(count, dims)) * 0.3
    return np.maximum(latent @ basis / np.sqrt(8) + noise + 0.5, 0).astype(np.float32)


@pytest.mark.parametrize("shape", [(50, 10), (1003, 17), (257, 1008)])
@pytest.mark.parametrize("splits", [10, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_inception_score_matches_torch_fidelity(shape, splits, shuffle):
    torch = pytest.importorskip("torch")
    isc = pytest.importorskip("torch_fidelity.metric_isc")
    logits = (np.random.default_rng(shape[0]).normal(size=shape) * 3).astype(np.float32)
    expected = isc.isc_features_to_metric(torch.from_numpy(logits), splits, shuffle, 7)
    mean, std = quality.inception_score(logits, splits, shuffle, rng_seed=7)
    assert mean == pytest.approx(expected["inception_score_mean"], abs=1e-6)
    assert std == pytest.approx(expected["inception_score_std"], abs=1e-6)


def test_inception_score_extremes():
    classes = 10
    confident = 50 * np.eye(classes, dtype=np.float32)[np.arange(1000) % classes]
    # Unshuffled, each split holds every class equally often: the score is the class count.
    assert quality.inception_score(confident, shuffle=False) == pytest.approx((classes, 0),
                                                                              abs=1e-6)
    mean, std = quality.inception_score(confident)
    assert 9 < mean < classes and 0 < std < 0.5  # shuffled splits are a little unbalanced
    same = np.tile(np.random.default_rng(0).normal(size=(1, 1008)), (100, 1))
    assert quality.inception_score(same) == pytest.approx((1, 0), abs=1e-9)
    with pytest.raises(MetricError, match="one image per split"):
        quality.inception_score(confident[:9])


def compute_prdc(real, fake, k=3):
    prdc = pytest.importorskip("prdc")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the counts
        return {key: float(value) for key, value in prdc.compute_prdc(real, fake, k).items()}


@pytest.mark.parametrize("dims,real_count,fake_count,k", [(64, 300, 211, 3), (64, 173, 260, 5),
                                                          (2048, 300, 211, 3)])
def test_prdc_matches_prdc_and_torch_fidelity(dims, real_count, fake_count, k):
    real = features(real_count, dims, 1)
    fake = features(fake_count, dims, 2, shift=0.3, scale=0.8)
    expected = compute_prdc(real, fake, k)
    result = quality.prdc(real, fake, k)
    assert result == pytest.approx(expected, abs=1e-6)
    # Not a degenerate case, where every point is in or out.
    assert all(0 < result[key] < 1 for key in ("precision", "recall", "coverage"))
    assert quality.density_coverage(real, fake, k) == (result["density"], result["coverage"])
    # torch-fidelity's PRC: the same radii and balls with d <= radius, which only exact ties
    # tell apart; its features_1 are the fakes. float64, so that its distances are exact.
    torch = pytest.importorskip("torch")
    prc = pytest.importorskip("torch_fidelity.metric_prc")
    precision, recall = prc.calculate_precision_recall_full(
        torch.from_numpy(fake).double(), torch.from_numpy(real).double(), k)
    assert (precision, recall) == pytest.approx((result["precision"], result["recall"]),
                                                abs=1e-6)


def test_prdc_behaviour():
    real = features(240, 64, 3)
    same = quality.prdc(real, real)
    assert (same["precision"], same["recall"], same["coverage"]) == (1, 1, 1)
    # Mode collapse: fakes from the core of one of four clusters.
    centres = np.random.default_rng(4).normal(size=(4, 16)) * 20
    clusters = np.random.default_rng(5).normal(size=(240, 16)) + np.repeat(centres, 60, axis=0)
    one_cluster = np.random.default_rng(6).normal(size=(120, 16)) * 0.5 + centres[0]
    found = quality.prdc(clusters, one_cluster)
    precision, recall = found["precision"], found["recall"]
    assert precision > 0.9 and recall < 0.3
    density, coverage = quality.density_coverage(clusters, one_cluster)
    assert coverage < 0.3 and density > 0.8


def test_block_size_changes_nothing():
    real, fake = features(130, 64, 7), features(97, 64, 8, shift=0.2)
    assert quality.prdc(real, fake, block_size=5) == quality.prdc(real, fake, block_size=10000)
    train = features(110, 64, 9)
    fraction, threshold = quality.memorisation_fraction(fake, train, 10, block_size=6)
    whole = quality.memorisation_fraction(fake, train, 10, block_size=10000)
    # The threshold is a distance: a GPU's products of other block shapes round it otherwise
    # (2e-7 relative on an H200).
    assert fraction == whole[0] and threshold == pytest.approx(whole[1], rel=1e-6)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_nearest_distances(exclude_self):
    references = features(90, 64, 10)
    queries = references if exclude_self else features(70, 64, 11)
    exact = np.linalg.norm(queries[:, None].astype(np.float64) - references[None], axis=-1)
    if exclude_self:
        np.fill_diagonal(exact, np.inf)
    order = np.argsort(exact, axis=1)[:, :2]
    for block_size in (4, 1000):
        distances, indices = quality.nearest_distances(queries, references, exclude_self, k=2,
                                                       block_size=block_size)
        assert distances.shape == indices.shape == (len(queries), 2)
        np.testing.assert_array_equal(indices, order)
        np.testing.assert_allclose(distances, np.take_along_axis(exact, order, 1), rtol=1e-5)


def test_memorisation_fraction():
    rng = np.random.default_rng(12)
    train = rng.normal(size=(3000, 16)).astype(np.float32)
    copies = train[rng.choice(3000, 500, replace=False)] + rng.normal(size=(500, 16)) * 1e-3
    fraction, threshold = quality.memorisation_fraction(copies, train)
    assert fraction > 0.99 and threshold > 0.1
    fresh = rng.normal(size=(3000, 16)).astype(np.float32)
    fraction, _ = quality.memorisation_fraction(fresh, train)
    assert 0.003 < fraction < 0.02


def test_bad_inputs():
    real = features(20, 8, 13)
    with pytest.raises(MetricError, match="shape"):
        quality.prdc(real, real[:, :4])
    with pytest.raises(MetricError, match="more than 3 fake"):
        quality.prdc(real, real[:3])
    with pytest.raises(MetricError, match="NaN"):
        quality.prdc(real, np.full((10, 8), np.nan))
    with pytest.raises(MetricError, match="queries to be the references"):
        quality.nearest_distances(real, real[:10], exclude_self=True)
