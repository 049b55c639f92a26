"""Inception features on the device mesh: of image batches, of a generator's samples (class-
balanced, or of one class, for a conditional one), of a folder, and the cached reference
statistics of a training dataset, of all its images or class by class.

Batches are sharded over the mesh's data axis and features come back replicated, so every
process holds all of them; with several hosts, each one passes the same full batches.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dcgan_jax import images, parallel, paths
from dcgan_jax import step as step_lib
from dcgan_jax.evaluation import inception, metrics, weights

# Latents of evaluation samples: fixed, so FID moves with the weights only.
EVAL_SEED = 0
# Reference features kept for KID: 10,000 x 2048 float32 is 80 MB on disk.
KID_REFERENCE_FEATURES = 10_000
# Bump when what the statistics measure changes, so old cached files are not read.
STATS_VERSION = 1
# Bump when what a class's statistics file holds changes (2: the class's features, which
# version 1 left out), so that older files are not read.
CLASS_STATS_VERSION = 2
# Characters of the dataset's fingerprint that end a statistics file's name.
FINGERPRINT_CHARS = 12


class FeatureExtractor:
    """pytorch-fid's InceptionV3 with given weights, replicated over `mesh`. With `logits`,
    each feature row is followed by the 1008 classifier logits of the same pass (the
    Inception Score's): `pool` and `logits` take them apart."""

    def __init__(self, weights_path: str, dims: int, mesh: jax.sharding.Mesh,
                 batch_size: int = 200, logits: bool = False):
        if dims not in inception.BLOCK_BY_DIMS:
            raise ValueError(f"dims={dims} must be one of {tuple(inception.BLOCK_BY_DIMS)}")
        state_dict = weights.read_state_dict(weights_path)
        try:
            variables = inception.variables_from_state_dict(state_dict, dims, weights_path,
                                                            logits)
        except ValueError as error:
            raise weights.WeightsError(str(error)) from None
        self.weights_digest = weights.file_digest(weights_path)
        self.dims, self.mesh, self.has_logits = dims, mesh, logits
        self.width = dims + (inception.NUM_LOGITS if logits else 0)
        self.batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
        self.variables = jax.device_put(variables, parallel.replicated(mesh))
        self._net = inception.FIDInceptionV3(dims, logits)
        self._of_images = jax.jit(
            lambda v, x: self._net.apply(v, inception.preprocess(x)),
            in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
            out_shardings=parallel.replicated(mesh))
        self._sample_fns: dict[tuple[int, bool], tuple[Any, Any]] = {}

    def of_images(self, batch: np.ndarray) -> np.ndarray:
        """Features of uint8 NHWC images (the same full batch on every process)."""
        count = len(batch)
        # Full batches share one shape and one compilation; a short (last) batch is padded
        # only to a multiple of the device count.
        devices = jax.device_count()
        padded = min(self.batch_size, -(-count // devices) * devices)
        if count < padded:
            pad = np.zeros((padded - count, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        array = jax.make_array_from_callback(batch.shape, parallel.batch_sharded(self.mesh),
                                             lambda index: batch[index])
        return parallel.fetch(self._of_images(self.variables, array))[:count]

    def of_batches(self, batches: Iterable[np.ndarray]) -> np.ndarray:
        """Features of batches of any size up to `batch_size`, in order."""
        chunks = [self.of_images(chunk) for batch in batches
                  for chunk in np.array_split(batch, -(-len(batch) // self.batch_size))
                  if len(chunk)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.width), np.float32)

    def pool(self, features: np.ndarray) -> np.ndarray:
        """FID's features of rows this extractor computed."""
        return features[:, :self.dims]

    def logits(self, features: np.ndarray) -> np.ndarray | None:
        """The classifier's logits of rows this extractor computed (None without them)."""
        return features[:, self.dims:] if self.has_logits else None

    def _samples_fn(self, config: Any, use_ema: bool) -> Any:
        """The jitted generator-to-features function of one run config."""
        key = (id(config), use_ema)
        if key not in self._sample_fns:
            def features(variables: Any, state: step_lib.GANState, offset: jax.Array,
                         labels: jax.Array | None) -> jax.Array:
                indices = offset + jnp.arange(self.batch_size)
                z = step_lib.latent_sequence(EVAL_SEED, indices, config.model.nz)
                z = jax.lax.with_sharding_constraint(z, parallel.batch_sharded(self.mesh))
                if labels is not None:
                    labels = jax.lax.with_sharding_constraint(
                        labels, parallel.batch_sharded(self.mesh))
                fake = step_lib.generate_images(state, z, config, use_ema, labels)
                # Quantised like the PNG files `sample files` writes: both give one FID.
                pixels = jnp.clip(jnp.rint((fake.astype(jnp.float32) + 1.0) * 127.5), 0, 255)
                return self._net.apply(variables, inception.preprocess(pixels.astype(jnp.uint8)))

            self._sample_fns[key] = (config, jax.jit(
                features, out_shardings=parallel.replicated(self.mesh)))
        return self._sample_fns[key][1]

    def of_samples(self, state: step_lib.GANState, config: Any, count: int,
                   use_ema: bool = True, class_index: int | None = None) -> np.ndarray:
        """Features of `count` images from G (EMA weights when kept and `use_ema`); image i
        is image i of `sample files --seed=0` (with `--class=class_index` when given): a
        conditional G's are class-balanced unless `class_index` names one class. Images
        never leave the device."""
        fn = self._samples_fn(config, use_ema)
        chunks = []
        for offset in range(0, count, self.batch_size):
            labels = images.sample_classes(np.arange(offset, offset + self.batch_size),
                                           config.model.num_classes, class_index)
            chunks.append(parallel.fetch(fn(self.variables, state, jnp.int32(offset),
                                            labels))[:count - offset])
        return np.concatenate(chunks)


def folder_images(folder: str, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 RGB batches of the image files directly in `folder`, sorted by name, as
    pytorch-fid reads them (no resizing: all must share one size)."""
    from PIL import Image

    from dcgan_jax.data import IMAGE_EXTENSIONS
    if not os.path.isdir(folder):
        raise metrics.MetricError(f"{folder} is not a folder of images")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if len(paths) < 2:
        raise metrics.MetricError(f"{folder} holds {len(paths)} image file(s); FID needs at "
                                  f"least 2 ({', '.join(IMAGE_EXTENSIONS)})")

    def read(path: str) -> np.ndarray:
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as error:
            raise metrics.MetricError(f"{path} cannot be read as an image: {error}") from None

    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            arrays = list(pool.map(read, chunk))
            for path, array in zip(chunk, arrays, strict=True):
                if array.shape != arrays[0].shape:
                    raise metrics.MetricError(
                        f"{path} is {array.shape[1]}x{array.shape[0]} but {chunk[0]} is "
                        f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; FID reads images of one "
                        f"size (resize them first)")
            yield np.stack(arrays)


def dataset_fingerprint(source: Any) -> str:
    """The dataset's fingerprint (`data.Source.fingerprint`) as process 0 reads it: hosts
    with copies of their own (other paths and times) then name the same statistics."""
    ours = source.fingerprint()
    if jax.process_count() == 1:
        return ours
    from jax.experimental import multihost_utils
    agreed = multihost_utils.broadcast_one_to_all(np.frombuffer(ours.encode(), np.uint8))
    return bytes(np.asarray(agreed, np.uint8)).decode()


def reference_cache_path(config: Any, extractor: FeatureExtractor, dataset_size: int,
                         count: int, fingerprint: str,
                         class_name: tuple[int, str] | None = None) -> str:
    """Where the reference statistics of this dataset, preprocessing and network live: of
    all `count` images, or of those of one class, `class_name` (its index and name). The
    name ends in the dataset's `fingerprint` (`dataset_fingerprint`), so a dataset edited in
    place, even to the same image count, gets statistics of its own."""
    of_class = ("" if class_name is None
                else f"-class{class_name[0]}-v{CLASS_STATS_VERSION}")
    key = "|".join(str(x) for x in (
        STATS_VERSION, config.dataset, dataset_size, count, config.model.resolution,
        config.model.channels, config.data.crop, extractor.dims, extractor.weights_digest,
        *((*class_name, CLASS_STATS_VERSION) if class_name else ())))
    slug = re.sub(r"[^\w.-]+", "_", config.dataset).strip("_")[-60:]
    name = (f"{slug}-{config.model.resolution}px-{count}{of_class}-{extractor.dims}d-"
            f"{hashlib.sha256(key.encode()).hexdigest()[:12]}-"
            f"{fingerprint[:FINGERPRINT_CHARS]}.npz")
    from dcgan_jax import data
    return os.path.join(data.cache_root(config.data.cache_dir), "fid_stats", name)


def stale_statistics(path: str) -> list[str]:
    """Cached statistics of the same dataset and settings as `path` but other content: the
    dataset changed since they were computed."""
    folder, name = os.path.split(path)
    settings = name[:-len(".npz") - FINGERPRINT_CHARS]
    return [os.path.join(folder, other) for other in
            (paths.list_names(folder) if paths.exists(folder) else [])
            if other.startswith(settings) and other != name and other.endswith(".npz")
            and len(other) == len(name)]


def _reference_features(config: Any, source: Any, extractor: FeatureExtractor,
                        count: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of the first `count` images of the evaluation order, and their labels
    (none from an unlabelled source)."""
    from dcgan_jax import data
    found, labels = [], []
    for batch in data.evaluation_batches(config, source, count, extractor.batch_size):
        found.append(extractor.pool(extractor.of_batches([batch["image"]])))
        if "label" in batch:
            labels.append(batch["label"])
    return (np.concatenate(found) if found else np.zeros((0, extractor.dims), np.float32),
            np.concatenate(labels) if labels else np.zeros((0,), np.int32))


def all_cached(files: list[str]) -> bool:
    """Whether every process finds all of `files`: computing them is a collective of every
    process, so all must decide alike (each host may have a cache of its own, and only
    process 0 writes)."""
    here = all(paths.is_file(path) for path in files)
    if jax.process_count() == 1:
        return here
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(here))))


def reference_statistics(config: Any, source: Any, extractor: FeatureExtractor,
                         count: int) -> tuple[metrics.Statistics, str, bool]:
    """Statistics of `count` dataset images (all when 0) as training sees them (cropped and
    resized, never flipped), and the features of the first KID_REFERENCE_FEATURES of them
    (KID's, precision/recall's and the memorisation check's real side): read from the
    cache, or computed and cached.

    Returns the statistics, the cache path, and whether they were just computed.
    """
    count = min(count or len(source), len(source))
    path = reference_cache_path(config, extractor, len(source), count,
                                dataset_fingerprint(source))
    if all_cached([path]):
        return metrics.Statistics.load(path), path, False
    found, _ = _reference_features(config, source, extractor, count)
    stats = metrics.Statistics.of(found, keep_features=KID_REFERENCE_FEATURES)
    if jax.process_index() == 0:
        stats.save(path)
    return stats, path, True


def class_reference_statistics(config: Any, source: Any, extractor: FeatureExtractor,
                               count: int) -> tuple[list[metrics.Statistics], str, bool]:
    """For each class of a labelled source, the statistics of its images among the `count`
    of `reference_statistics`, with the features of its first KID_REFERENCE_FEATURES /
    classes (the per-class references of every metric other than FID; so that all classes
    together keep as many as `reference_statistics`, 80 MB at 2048-d): read from the cache,
    or computed in one pass over the data and cached, a file per class.

    Returns the statistics by class, their cache files, and whether they were just
    computed.
    """
    count = min(count or len(source), len(source))
    fingerprint = dataset_fingerprint(source)
    cache = [reference_cache_path(config, extractor, len(source), count, fingerprint,
                                  (label, name))
             for label, name in enumerate(source.class_names)]
    if all_cached(cache):
        return [metrics.Statistics.load(path) for path in cache], cache, False
    found, labels = _reference_features(config, source, extractor, count)
    kept = max(KID_REFERENCE_FEATURES // len(source.class_names), 1)
    by_class = []
    for label, name in enumerate(source.class_names):
        of_class = found[labels == label]
        if len(of_class) < 2:
            raise metrics.MetricError(
                f"class {label} ({name}) has {len(of_class)} image(s) among the {count:,} "
                f"reference images of {config.dataset}; per-class statistics need at least 2 "
                f"a class: raise --num_reference (0 reads them all)")
        by_class.append(metrics.Statistics.of(of_class, keep_features=kept))
    if jax.process_index() == 0:
        for path, stats in zip(cache, by_class, strict=True):
            stats.save(path)
    return by_class, cache, True
