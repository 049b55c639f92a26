"""The metrics of a run's generator against its dataset, as config.eval describes them (FID,
KID, the Inception Score, precision/recall, density/coverage, the memorisation check), and
intra-class FID: each class of a conditional generator against that class's images."""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax

from dcgan_jax import config as config_lib
from dcgan_jax import data
from dcgan_jax import step as step_lib
from dcgan_jax.evaluation import features, metrics, weights


def feature_extractor(config: Any, mesh: jax.sharding.Mesh,
                       logits: bool = False) -> features.FeatureExtractor:
    e = config.eval
    path = weights.locate(e.fid_weights, os.path.join(
        data.cache_root(config.data.cache_dir), "weights"), e.allow_unknown_weights)
    return features.FeatureExtractor(path, e.dims, mesh, e.batch_size, logits)


def _reference_origin(start: float, cache: str, computed: bool, shown: str = "") -> str:
    """Where the reference statistics (`cache`, one of their files) came from, in words;
    `shown` names them instead of `cache` (the folder of per-class files)."""
    shown = shown or cache
    if not computed:
        return f"read from {shown}"
    changed = ("; the dataset changed since its statistics were cached, so they were "
               "computed anew" if features.stale_statistics(cache) else "")
    return f"computed in {time.perf_counter() - start:.1f} s and cached in {shown}{changed}"


def _generator_name(state: step_lib.GANState, use_ema: bool) -> str:
    return "averaged (EMA) G" if use_ema and state.ema is not None else "G"


class Evaluator:
    """Loads the Inception weights and the dataset's reference statistics once (computing
    and caching the statistics on first use), then scores generators by the metrics of
    config.eval.metrics. A conditional generator's samples are class-balanced
    (`images.sample_classes`); the reference is the dataset as it is."""

    def __init__(self, config: Any, mesh: jax.sharding.Mesh, source: Sequence[Any]):
        self.config = config
        e = config.eval
        self.metrics = config_lib.eval_metrics(e.metrics)
        self.extractor = feature_extractor(config, mesh, logits="is" in self.metrics)
        start = time.perf_counter()
        self.reference, cache, computed = features.reference_statistics(
            config, source, self.extractor, e.num_reference)
        self.reference_line = (f"FID reference: {self.reference.count:,} images of "
                               f"{config.dataset}, {e.dims}-d features, "
                               f"{_reference_origin(start, cache, computed)}")

    def __call__(self, state: step_lib.GANState, use_ema: bool = True) -> dict[str, float]:
        e = self.config.eval
        fake = self.extractor.of_samples(state, self.config, e.num_samples, use_ema)
        return metrics.score(self.metrics, self.extractor.pool(fake), self.reference,
                             self.extractor.logits(fake), e.kid_subsets, e.kid_subset_size)

    def describe(self, state: step_lib.GANState, use_ema: bool = True) -> str:
        balanced = "class-balanced " if self.config.model.num_classes else ""
        return (f"{self.config.eval.num_samples:,} {balanced}samples of "
                f"{_generator_name(state, use_ema)} vs {self.reference.count:,} dataset images")


class IntraClassEvaluator:
    """Intra-class FID, as PyTorch-StudioGAN reports it: for each class, the FID of a
    conditional generator's samples of that class against the dataset images of that
    class. config.eval.num_samples is split evenly over the classes; each class's
    reference is its images among the config.eval.num_reference of `Evaluator`'s."""

    def __init__(self, config: Any, mesh: jax.sharding.Mesh, source: data.Source):
        classes = config.model.num_classes
        if not classes:
            raise metrics.MetricError("intra-class FID needs a class-conditional model")
        if source.num_classes != classes:
            raise data.DataError(
                f"config.dataset={config.dataset!r} has {source.num_classes} classes but the "
                f"run's model has config.model.num_classes={classes}; evaluate against the "
                f"data the run trained on")
        self.config, self.class_names = config, source.class_names
        self.samples_per_class = config.eval.num_samples // classes
        if self.samples_per_class < 2:
            raise metrics.MetricError(
                f"{config.eval.num_samples} samples give each of the {classes} classes "
                f"{self.samples_per_class}; intra-class FID needs at least 2 a class: give "
                f"--num_samples={2 * classes} or more")
        self.extractor = feature_extractor(config, mesh)
        start = time.perf_counter()
        self.references, cache, computed = features.class_reference_statistics(
            config, source, self.extractor, config.eval.num_reference)
        counts = [reference.count for reference in self.references]
        self.reference_line = (
            f"Intra-class FID reference: {sum(counts):,} images of {config.dataset} in "
            f"{classes} classes ({min(counts):,} to {max(counts):,} a class), "
            f"{config.eval.dims}-d features, "
            f"{_reference_origin(start, cache[0], computed, os.path.dirname(cache[0]))}")

    def __call__(self, state: step_lib.GANState, use_ema: bool = True) -> list[float]:
        """The FID of each class, by class index."""
        scores = []
        for label, reference in enumerate(self.references):
            fake = self.extractor.of_samples(state, self.config, self.samples_per_class,
                                             use_ema, class_index=label)
            scores.append(metrics.fid(metrics.Statistics.of(fake), reference))
        return scores

    def describe(self, state: step_lib.GANState, use_ema: bool = True) -> str:
        classes, asked = self.config.model.num_classes, self.config.eval.num_samples
        used = self.samples_per_class * classes
        return (f"{self.samples_per_class:,} samples of each of {classes} classes ({used:,} "
                f"{'in all' if used == asked else f'of the {asked:,} asked for'}) of "
                f"{_generator_name(state, use_ema)} vs "
                f"{sum(r.count for r in self.references):,} dataset images")
