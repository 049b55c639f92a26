"""FID and KID of a run's generator against its dataset, as config.eval describes them."""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax

from dcgan_jax import data, step as step_lib
from dcgan_jax.evaluation import features, metrics, weights


class Evaluator:
    """Loads the FID weights and the dataset's reference statistics once (computing and
    caching the statistics on first use), then scores generators."""

    def __init__(self, config: Any, mesh: jax.sharding.Mesh, source: Sequence[Any]):
        self.config = config
        e = config.eval
        path = weights.locate(e.fid_weights, os.path.join(
            data.cache_root(config.data.cache_dir), "weights"), e.allow_unknown_weights)
        self.extractor = features.FeatureExtractor(path, e.dims, mesh, e.batch_size)
        start = time.perf_counter()
        self.reference, cache, computed = features.reference_statistics(
            config, source, self.extractor, e.num_reference)
        how = (f"computed in {time.perf_counter() - start:.1f} s and cached in {cache}"
               if computed else f"read from {cache}")
        self.reference_line = (f"FID reference: {self.reference.count:,} images of "
                               f"{config.dataset}, {e.dims}-d features, {how}")

    def __call__(self, state: step_lib.GANState, use_ema: bool = True) -> dict[str, float]:
        e = self.config.eval
        fake = self.extractor.of_samples(state, self.config, e.num_samples, use_ema)
        return metrics.scores(fake, self.reference, e.kid_subsets, e.kid_subset_size)

    def describe(self, state: step_lib.GANState, use_ema: bool = True) -> str:
        which = "averaged (EMA) G" if use_ema and state.ema is not None else "G"
        return (f"{self.config.eval.num_samples:,} samples of {which} vs "
                f"{self.reference.count:,} dataset images")
