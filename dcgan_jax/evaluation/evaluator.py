"""The metrics of a run's generator against its dataset, as config.eval describes them (FID,
KID, the Inception Score, precision/recall, density/coverage, the memorisation check), and
the same class by class: each class of a conditional generator against that class's images
(intra-class FID and its like)."""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax

from dcgan_jax import config as config_lib
from dcgan_jax import data
from dcgan_jax import step as step_lib
from dcgan_jax.evaluation import features, metrics, quality, weights


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
    """The metrics of config.eval.metrics class by class: for each class, a conditional
    generator's samples of that class against the dataset images of that class. With fid,
    this is intra-class FID as PyTorch-StudioGAN reports it. config.eval.num_samples is split
    evenly over the classes; each class's reference is its images among the
    config.eval.num_reference of `Evaluator`'s (KID_REFERENCE_FEATURES / classes of them for
    the metrics that read features)."""

    def __init__(self, config: Any, mesh: jax.sharding.Mesh, source: data.Source):
        classes = config.model.num_classes
        if not classes:
            raise metrics.MetricError("per-class metrics need a class-conditional model")
        if source.num_classes != classes:
            raise data.DataError(
                f"config.dataset={config.dataset!r} has {source.num_classes} classes but the "
                f"run's model has config.model.num_classes={classes}; evaluate against the "
                f"data the run trained on")
        e = config.eval
        self.config, self.class_names = config, source.class_names
        self.metrics = config_lib.eval_metrics(e.metrics)
        self.samples_per_class = e.num_samples // classes
        # Before the weights and the reference: too few samples fail at once.
        least, what = _least(self.metrics, side=0)
        if self.samples_per_class < least:
            raise metrics.MetricError(
                f"{e.num_samples} samples give each of the {classes} classes "
                f"{self.samples_per_class}; {what} needs at least {least} a class: give "
                f"--num_samples={least * classes} or more")
        self.extractor = feature_extractor(config, mesh, logits="is" in self.metrics)
        start = time.perf_counter()
        self.references, cache, computed = features.class_reference_statistics(
            config, source, self.extractor, e.num_reference)
        counts = [reference.count for reference in self.references]
        for label, (name, reference) in enumerate(zip(self.class_names, self.references,
                                                      strict=True)):
            _check_reference(self.metrics, label, name, reference, sum(counts), classes,
                             config.dataset)
        # KID's subsets, as `metrics.kid` draws them: no larger than either side.
        self.kid_subset_sizes = [min(e.kid_subset_size, self.samples_per_class,
                                     len(reference.features)) for reference in self.references]
        self.reference_line = (
            f"Per-class reference: {sum(counts):,} images of {config.dataset} in "
            f"{classes} classes ({min(counts):,} to {max(counts):,} a class), "
            f"{e.dims}-d features, "
            f"{_reference_origin(start, cache[0], computed, os.path.dirname(cache[0]))}")

    def __call__(self, state: step_lib.GANState,
                 use_ema: bool = True) -> list[dict[str, float]]:
        """The values of each class (`metrics.score`'s), by class index."""
        e = self.config.eval
        scores = []
        for label, reference in enumerate(self.references):
            fake = self.extractor.of_samples(state, self.config, self.samples_per_class,
                                             use_ema, class_index=label)
            scores.append(metrics.score(self.metrics, self.extractor.pool(fake), reference,
                                        self.extractor.logits(fake), e.kid_subsets,
                                        self.kid_subset_sizes[label]))
        return scores

    def describe(self, state: step_lib.GANState, use_ema: bool = True) -> str:
        classes, asked = self.config.model.num_classes, self.config.eval.num_samples
        used = self.samples_per_class * classes
        return (f"{self.samples_per_class:,} samples of each of {classes} classes ({used:,} "
                f"{'in all' if used == asked else f'of the {asked:,} asked for'}) of "
                f"{_generator_name(state, use_ema)} vs "
                f"{sum(r.count for r in self.references):,} dataset images")


def per_class_lines(class_names: Sequence[str], scores: Sequence[dict[str, float]],
                    kid_subsets: int, kid_subset_sizes: Sequence[int]) -> list[str]:
    """`evaluate --per_class`'s lines: one per class with all its values (`class 3 (three):
    FID ... KID ... ± ... precision ...`), then their means over the classes, intra-class
    FID's line and one of the others'. Stds (over KID's subsets, IS's splits) belong to a
    class and are not averaged."""

    lines = [f"class {label} ({name}): {metrics.evaluation_text(values, decimals=6)}"
             for label, (name, values) in enumerate(zip(class_names, scores, strict=True))]
    classes = len(scores)
    means = {name: sum(values[name] for values in scores) / classes
             for name in metrics.METRIC_LABELS if name in scores[0]}
    if "fid" in means:
        lines.append(f"intra-class FID (mean of {classes} classes): {means.pop('fid'):.6f}")
    if means:
        least, most = min(kid_subset_sizes), max(kid_subset_sizes)
        sizes = f"{least}" if least == most else f"{least} to {most}"
        lines.append(f"per-class mean of {classes} classes: " + " ".join(
            f"{metrics.METRIC_LABELS[name]} {value:.6f}"
            + (f" ({kid_subsets} subsets of {sizes} a class)" if name == "kid" else "")
            for name, value in means.items()))
    return lines


# The fewest generated samples of one class, and reference images (FID: all of the class's;
# the others: its kept features), that each metric needs, and its name in messages.
_LEAST_PER_CLASS = {
    "fid": (2, 2, "intra-class FID"),
    "kid": (2, 2, "KID"),
    # 5 a split: with 1 a split the score is exactly 1, whatever G draws.
    "is": (5 * quality.ISC_SPLITS, 0, f"the Inception Score (5 in each of its "
                                      f"{quality.ISC_SPLITS} splits)"),
    "pr": (quality.NEAREST_K + 1, quality.NEAREST_K + 1,
           f"precision/recall (k={quality.NEAREST_K})"),
    "dc": (1, quality.NEAREST_K + 1, f"density/coverage (k={quality.NEAREST_K})"),
    # Its threshold is the 1st percentile of the reference's nearest-neighbour distances:
    # with fewer than 100, that is their minimum and copy-free samples score well above 0.01.
    "mem": (1, 100, "the memorisation check (its 1st percentile)"),
}


def _least(wanted: Sequence[str], side: int) -> tuple[int, str]:
    """The most demanding of the `wanted` metrics on one side of a class (0: its samples, 1:
    its reference images): the count it needs, and its name."""
    name = max(wanted, key=lambda name: _LEAST_PER_CLASS[name][side])
    return _LEAST_PER_CLASS[name][side], _LEAST_PER_CLASS[name][2]


def _check_reference(wanted: Sequence[str], label: int, name: str,
                     reference: metrics.Statistics, total: int, classes: int,
                     dataset: str) -> None:
    """One line when class `label` has too few reference images for a wanted metric: FID
    reads all of the class's, the others its kept features (features.KID_REFERENCE_FEATURES
    / classes at most)."""
    for metric in wanted:
        least, what = _LEAST_PER_CLASS[metric][1], _LEAST_PER_CLASS[metric][2]
        if reference.count < least:
            raise metrics.MetricError(
                f"class {label} ({name}) has {reference.count} image(s) among the {total:,} "
                f"reference images of {dataset}; {what} needs at least {least} a class: raise "
                f"--num_reference (0 reads them all), or drop {metric} from --metrics")
        if metric != "fid" and len(reference.features) < least:
            raise metrics.MetricError(
                f"class {label} ({name}) keeps {len(reference.features)} reference features "
                f"(the {features.KID_REFERENCE_FEATURES:,} kept are shared by the {classes} "
                f"classes); {what} needs at least {least} a class: drop {metric} from "
                f"--metrics")
