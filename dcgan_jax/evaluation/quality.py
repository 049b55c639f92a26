"""Metrics beyond FID: Inception Score, k-NN precision/recall/density/coverage, memorisation.

The Inception Score follows torch-fidelity's ISC (`torch_fidelity/metric_isc.py`), numbers
included. Precision and recall follow Kynkäänniemi et al. 2019, density and coverage Naeem et
al. 2020, as the `prdc` package (Naeem et al.'s reference code) computes them; torch-fidelity's
PRC computes the same precision and recall except on exact ties (see `prdc`).

Distances between features run in JAX in blocks of rows and columns, so that 50k x 50k
distances never exist at once: each block keeps only its rows' k smallest distances, or the
counts and flags the metrics need.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dcgan_jax.evaluation.metrics import MetricError

ISC_SPLITS = 10
ISC_SEED = 2020  # torch-fidelity's rng_seed, so that its splits and ours hold the same images
NEAREST_K = 3  # Kynkäänniemi et al.'s, Naeem et al.'s and torch-fidelity's default
BLOCK_SIZE = 2048  # rows and columns of one block of distances: 16 MB of float32


def inception_score(logits: np.ndarray, splits: int = ISC_SPLITS, shuffle: bool = True,
                    rng_seed: int = ISC_SEED) -> tuple[float, float]:
    """Mean and std over `splits` of exp(E_x KL(p(y|x) || p(y))), as torch-fidelity computes it.

    `logits` are the Inception's 1008-way (unbiased) logits, one row per image. As in
    torch-fidelity, rows are first shuffled with numpy's RandomState(rng_seed).permutation (so
    the splits hold the same images as its), softmax runs in float64, split i is rows
    [i N // splits, (i + 1) N // splits) (sizes differ by one when N is not a multiple), p(y) is
    each split's mean, and the std has ddof 0. One difference: a class whose probability
    underflows to 0 in a whole split adds 0 here, where torch-fidelity's 0 * inf gives nan.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise MetricError(f"the Inception Score needs logits of shape [images, classes]; got "
                          f"shape {logits.shape}")
    count = len(logits)
    if splits < 1 or count < splits:
        raise MetricError(f"the Inception Score needs at least one image per split; got "
                          f"{count} images for {splits} splits")
    if shuffle:
        logits = logits[np.random.RandomState(rng_seed).permutation(count)]
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = np.zeros(splits)
    for i in range(splits):
        chunk = slice(i * count // splits, (i + 1) * count // splits)
        log_q = np.log(p[chunk].mean(axis=0))
        terms = np.where(p[chunk] > 0, p[chunk] * (log_p[chunk] - log_q), 0.0)
        scores[i] = np.exp(terms.sum(axis=1).mean())
    return float(np.mean(scores)), float(np.std(scores))


def _distances(rows: jax.Array, row_norms: jax.Array, cols: jax.Array,
               col_norms: jax.Array) -> jax.Array:
    """Euclidean distances as |a|^2 - 2 a.b + |b|^2, clamped at 0. HIGHEST precision: a GPU's
    default float32 product (TF32) would move them by 1e-3 relative."""
    products = jnp.dot(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(jnp.maximum(row_norms[:, None] - 2 * products + col_norms[None, :], 0))


def _norms(blocks: jax.Array) -> jax.Array:
    return jnp.sum(blocks * blocks, axis=-1)


@functools.partial(jax.jit, static_argnames=("k", "exclude_self"))
def _smallest(queries: jax.Array, references: jax.Array, reference_count: jax.Array, k: int,
              exclude_self: bool) -> tuple[jax.Array, jax.Array]:
    """The k smallest distances of each query row (ascending) and their references' indices.

    Both sides come in padded blocks [blocks, size, D]; padded references are at infinity, and
    so is a query's own row when `exclude_self`. Each block of queries scans the blocks of
    references, merging a block's distances into its running k smallest.
    """
    query_size, reference_size = queries.shape[1], references.shape[1]
    query_norms, reference_norms = _norms(queries), _norms(references)

    def query_block(b):
        rows, row_norms = queries[b], query_norms[b]
        row_ids = b * query_size + jnp.arange(query_size)

        def merge(carry, c):
            best, best_ids = carry
            col_ids = c * reference_size + jnp.arange(reference_size)
            d = _distances(rows, row_norms, references[c], reference_norms[c])
            far = (col_ids >= reference_count)[None, :]
            if exclude_self:
                far = far | (row_ids[:, None] == col_ids[None, :])
            d = jnp.where(far, jnp.inf, d)
            candidates = jnp.concatenate([best, d], axis=1)
            candidate_ids = jnp.concatenate(
                [best_ids, jnp.broadcast_to(col_ids, d.shape)], axis=1)
            negated, order = jax.lax.top_k(-candidates, k)
            return (-negated, jnp.take_along_axis(candidate_ids, order, axis=1)), None

        init = (jnp.full((query_size, k), jnp.inf, rows.dtype),
                jnp.zeros((query_size, k), jnp.int32))
        (best, best_ids), _ = jax.lax.scan(merge, init, jnp.arange(len(references)))
        return best, best_ids

    return jax.lax.map(query_block, jnp.arange(len(queries)))


@jax.jit
def _balls(real: jax.Array, real_radii: jax.Array, fake: jax.Array, fake_radii: jax.Array,
           fake_count: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each fake, how many real balls hold it (d < real radius); for each real, whether
    some fake is in its ball (d < its radius), and whether it is in some fake's ball (d < that
    fake's radius). Padded reals have radius -inf, padded fakes are at infinity."""
    real_size, fake_size = real.shape[1], fake.shape[1]
    real_norms, fake_norms = _norms(real), _norms(fake)

    def real_block(b):
        rows, radii = real[b], real_radii[b]

        def fake_block(carry, c):
            covered, recalled = carry
            col_ids = c * fake_size + jnp.arange(fake_size)
            d = _distances(rows, real_norms[b], fake[c], fake_norms[c])
            d = jnp.where((col_ids < fake_count)[None, :], d, jnp.inf)
            inside = d < radii[:, None]
            covered = covered | inside.any(axis=1)
            recalled = recalled | (d < fake_radii[c][None, :]).any(axis=1)
            return (covered, recalled), inside.sum(axis=0, dtype=jnp.int32)

        init = (jnp.zeros(real_size, bool), jnp.zeros(real_size, bool))
        (covered, recalled), counts = jax.lax.scan(fake_block, init, jnp.arange(len(fake)))
        return counts, covered, recalled

    counts, covered, recalled = jax.lax.map(real_block, jnp.arange(len(real)))
    return counts.sum(axis=0), covered, recalled


def _blocks(features: np.ndarray, block_size: int, fill: float = 0.0) -> jax.Array:
    """[N, ...] as [blocks, size, ...], padded with `fill`; the size is at most N, so that few
    points do not pay for a large block."""
    size = max(1, min(block_size, len(features)))
    padded = -len(features) % size
    features = np.concatenate(
        [features, np.full((padded, *features.shape[1:]), fill, features.dtype)])
    return jnp.asarray(features.reshape(-1, size, *features.shape[1:]))


def _features(*arrays: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
    """Checked float32 features, centred on the first array's mean (in float64).

    Centring leaves distances as they are and makes the |a|^2 - 2 a.b + |b|^2 form exact to
    about 1e-7 of the distances, where Inception features (non-negative, far from 0) would
    lose 1e-5 or more to cancellation.
    """
    arrays = [np.asarray(a) for a in arrays]
    for array, name in zip(arrays, names, strict=True):
        if array.ndim != 2 or array.shape[1] != arrays[0].shape[1]:
            raise MetricError(f"{name} features must have shape [N, {arrays[0].shape[-1]}]; "
                              f"got shape {array.shape}")
        if not np.isfinite(array).all():
            raise MetricError(f"{name} features hold NaN or infinite values")
    centre = arrays[0].mean(axis=0, dtype=np.float64)
    return [(a - centre).astype(np.float32) for a in arrays]


def _check_count(count: int, k: int, name: str) -> None:
    if k < 1:
        raise MetricError(f"k-NN metrics need k >= 1; got k={k}")
    if count <= k:
        raise MetricError(f"k-NN metrics with k={k} need more than {k} {name} features; got "
                          f"{count}")


def _nearest(queries: jax.Array, query_count: int, references: jax.Array,
             reference_count: int, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """`_smallest` of blocks from `_blocks`, as [count, k] host arrays."""
    distances, indices = _smallest(queries, references, jnp.int32(reference_count), k=k,
                                   exclude_self=exclude_self)
    return (np.asarray(distances).reshape(-1, k)[:query_count],
            np.asarray(indices).reshape(-1, k)[:query_count])


def _radii(blocks: jax.Array, count: int, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest other point: prdc's and torch-fidelity's
    (k+1)-th smallest distance with the point's own 0 among them."""
    return _nearest(blocks, count, blocks, count, k, True)[0][:, -1]


def nearest_distances(queries: np.ndarray, references: np.ndarray, exclude_self: bool = False,
                      k: int = 1, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Distances [Nq, k] (ascending, float32) from each query to its k nearest references, and
    those references' indices [Nq, k].

    With `exclude_self`, queries are the references (row i is reference i) and each skips
    itself. Distances below about 1e-3 of the features' spread are rounding, not distance.
    """
    queries, references = _features(references, queries, names=("reference", "query"))[::-1]
    if exclude_self and len(queries) != len(references):
        raise MetricError(f"exclude_self needs the queries to be the references; got "
                          f"{len(queries)} queries and {len(references)} references")
    if k < 1 or len(references) - exclude_self < k:
        raise MetricError(f"{k} nearest references need at least {k + exclude_self} "
                          f"references; got {len(references)}")
    return _nearest(_blocks(queries, block_size), len(queries),
                    _blocks(references, block_size), len(references), k, exclude_self)


def prdc(real: np.ndarray, fake: np.ndarray, k: int = NEAREST_K,
         block_size: int = BLOCK_SIZE) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` against `real` features [N, D].

    Exactly prdc.compute_prdc(real, fake, nearest_k=k)'s definitions. A real point's radius is
    the distance to its k-th nearest other real point, a fake's to its k-th nearest other fake.
    - precision: the fraction of fakes strictly inside (d < radius) some real point's ball;
    - recall: the fraction of reals strictly inside some fake's ball;
    - density: the number of real balls holding each fake, over k, averaged over fakes (1 on
      average when fakes are distributed as reals; it exceeds 1 where fakes crowd);
    - coverage: the fraction of reals whose ball holds some fake.
    torch-fidelity's PRC (its input1 the fakes) uses d <= radius; the two differ only where a
    distance equals a radius exactly, as among duplicated points, and even there rounding of
    the near-0 distances decides in all three implementations.
    """
    real, fake = _features(real, fake, names=("real", "fake"))
    return _prdc(real, fake, k, block_size, recall=True)


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = NEAREST_K,
                     block_size: int = BLOCK_SIZE) -> tuple[float, float]:
    """Naeem et al.'s density and coverage (see `prdc`); they need no fake radii, which saves
    one of the three passes over distances."""
    real, fake = _features(real, fake, names=("real", "fake"))
    result = _prdc(real, fake, k, block_size, recall=False)
    return result["density"], result["coverage"]


def _prdc(real: np.ndarray, fake: np.ndarray, k: int, block_size: int,
          recall: bool) -> dict[str, float]:
    _check_count(len(real), k, "real")
    if recall:
        _check_count(len(fake), k, "fake")
    elif len(fake) < 1:
        raise MetricError("density and coverage need at least one fake feature")
    real_blocks, fake_blocks = _blocks(real, block_size), _blocks(fake, block_size)
    real_radii = _radii(real_blocks, len(real), k)
    fake_radii = (_radii(fake_blocks, len(fake), k) if recall
                  else np.full(len(fake), -np.inf, np.float32))
    counts, covered, recalled = _balls(
        real_blocks, _blocks(real_radii, block_size, -np.inf),
        fake_blocks, _blocks(fake_radii, block_size, -np.inf), jnp.int32(len(fake)))
    counts = np.asarray(counts).reshape(-1)[:len(fake)]
    covered = np.asarray(covered).reshape(-1)[:len(real)]
    result = {"precision": float(np.mean(counts > 0)),
              "density": float(counts.sum(dtype=np.int64) / (k * len(fake))),
              "coverage": float(np.mean(covered))}
    if recall:
        result["recall"] = float(np.mean(np.asarray(recalled).reshape(-1)[:len(real)]))
    return result


def memorisation_fraction(fake: np.ndarray, train: np.ndarray, percentile: float = 1.0,
                          block_size: int = BLOCK_SIZE) -> tuple[float, float]:
    """The fraction of fakes nearer their nearest training point than `threshold`, and the
    threshold: the `percentile`-th percentile (numpy's linear interpolation) of the training
    points' distances to their nearest other training point.

    How to read it: fakes drawn from the training distribution, no closer to the training set
    than its own points are to each other, give about percentile / 100 (0.01 by default); a
    generator that copies training images gives more, up to 1 when every fake is a near copy.
    Values below percentile / 100 mean fakes far from the training set (poor or novel), not
    less memorisation. Exact duplicates in the training set make the threshold about 0, and
    the fraction then measures nothing: deduplicate first. With fewer fakes than about
    100 / percentile, the fraction is mostly noise.
    """
    if not 0 <= percentile <= 100:
        raise MetricError(f"percentile must be in [0, 100]; got {percentile}")
    train, fake = _features(train, fake, names=("training", "fake"))
    _check_count(len(train), 1, "training")
    if len(fake) < 1:
        raise MetricError("the memorisation fraction needs at least one fake feature")
    train_blocks = _blocks(train, block_size)
    train_nearest = _nearest(train_blocks, len(train), train_blocks, len(train), 1, True)[0]
    threshold = float(np.percentile(train_nearest[:, 0].astype(np.float64), percentile))
    fake_nearest = _nearest(_blocks(fake, block_size), len(fake), train_blocks, len(train), 1,
                            False)[0][:, 0]
    return float(np.mean(fake_nearest < threshold)), threshold
