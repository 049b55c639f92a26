"""Figures from a trained run, needing only its workdir (config.json and checkpoints).

  python -m dcgan_jax.sample MODE --workdir=RUN [--step=N] [--seed=S] [--out=PATH]

Modes:
  grid          a rows x cols PNG of samples
  files         --num individual PNG files in a folder (for FID tools)
  interpolate   linear and spherical paths through --points latents: a PNG each with one
                row per segment, key points in the first and last columns, and a GIF each;
                with --between_classes=A,B,... a class-conditional run's path from class A
                to class B (and on) at one latent instead
  classes       a class-conditional run's classes, a row each, over --cols latents (the
                same in every row); the class names are printed in row order
  truncation    --rows images of the seed, a row each, untruncated in the first column and
                then truncated at each of --truncations; the columns' values are printed
  gif           the run's samples/step_*.png as an animated GIF of training
  real_vs_fake  real training images beside samples (reads the dataset)
  nearest       memorisation check: --rows samples, each beside its --cols nearest training
                images (4 unless given) by Inception features and by pixels, among the first
                --num training images in evaluation order (0: all); reads the dataset and the
                run's FID weights (config.eval), and prints the nearest distances
  plot          losses and D outputs over steps from metrics.jsonl
  fid           a panel per metric of config.eval.metrics (FID, KID, IS, precision, ...)
                over steps from the evaluations in metrics.jsonl (a run trained with
                --config.eval.every > 0)
  summary       parameter tables of G and D
The averaged (EMA) generator is used when the run has one, unless --no_ema is given; it
computes in float32 whatever the training dtype.
A class-conditional run's grid, files, interpolation key points and real_vs_fake samples are
class-balanced, image i of class i mod num_classes (as in training's sample grids), or all
of class K with --class=K.
--truncation=T (grid, files, interpolate, classes, real_vs_fake, nearest) is BigGAN's truncation
trick: latent entries beyond |T| are redrawn within [-T, T], trading diversity for fidelity;
entries within |T| are kept, so image i of a seed stays comparable across T.
GIFs narrower than 256 pixels are enlarged by a whole factor, nearest neighbour.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
from typing import Any, Callable, Sequence

if __name__ == "__main__":  # Before the imports below: Ctrl-C during them is one line too.
    from dcgan_jax import signals
    signals.exit_on_stop_signals("dcgan_jax.sample")

import imageio.v3 as iio  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from dcgan_jax import checkpoints, cli, images, parallel, paths  # noqa: E402
from dcgan_jax import step as step_lib
from dcgan_jax import workdir as workdir_lib  # noqa: E402
from dcgan_jax.errors import UserFacingError  # noqa: E402
from dcgan_jax.losses import D_OUTPUT_NAMES, PROBABILITY  # noqa: E402

MODES = ("grid", "files", "interpolate", "classes", "truncation", "gif", "real_vs_fake", "nearest",
         "plot", "fid", "summary")
# The modes that draw images of given classes, and so take --class.
CLASS_MODES = ("grid", "files", "interpolate", "real_vs_fake")
# The modes that draw latents, and so take --truncation (the truncation mode has its own).
LATENT_MODES = ("grid", "files", "interpolate", "classes", "real_vs_fake", "nearest")
# The truncation figure's columns after the untruncated one: from hardly any effect to little
# diversity left.
DEFAULT_TRUNCATIONS = (2.0, 1.5, 1.0, 0.7, 0.5, 0.3)
# Folded into image i's key (step.latent_sequence's) to draw what replaces its latent's entries
# beyond a truncation: a stream apart from the latent's own draw.
TRUNCATION_STREAM = 2**31 - 1
# Class names listed in an error about a class number, when there are no more of them.
LISTED_CLASSES = 20
# The nearest figure's training images per space without --cols: enough to see whether a
# sample copies one image or sits among several, few enough to stay legible.
NEAREST_COLS = 4
# The nearest figure's spaces, in column order: key, column title, printed name.
NEAREST_SPACES = (("inception", "nearest (Inception)", "Inception"),
                  ("pixels", "nearest (pixels)", "pixels"))

flags.DEFINE_string("workdir", None, "The run's workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step to restore; the latest by default.")
flags.DEFINE_integer("seed", 0, "Seed of the latents: the same seed gives the same images.")
flags.DEFINE_string("out", None, "Output file or folder; under WORKDIR/figures by default.")
flags.DEFINE_integer("rows", 8, "Grid rows; of nearest, the generated images.")
flags.DEFINE_integer("cols", 8, "Grid columns; of nearest, the training images shown per "
                     f"space ({NEAREST_COLS} unless given).")
flags.DEFINE_integer("num", 1000, "Images for `files`; of nearest, the training images "
                     "searched, the first in evaluation order (0: all).")
flags.DEFINE_integer("batch_size", 256, "Images per generator call for `files`; rounded "
                     "up to a multiple of the device count.")
flags.DEFINE_integer("points", 4, "Latent points an interpolation passes through.")
flags.DEFINE_integer("frames", 8, "Steps from one interpolation point to the next: a PNG "
                     "row holds frames + 1 images.")
flags.DEFINE_float("fps", 8.0, "Frames per second of GIFs.")
flags.DEFINE_bool("no_ema", False, "Use G's raw weights even when the run averages them.")
flags.DEFINE_integer("class", None, "A class-conditional run's class K: all images of "
                     f"{', '.join(CLASS_MODES)} are of class K (class-balanced without it).")
flags.DEFINE_list("between_classes", None, "interpolate of a class-conditional run: from "
                  "class A to class B (and on) at one latent, e.g. --between_classes=3,5.")
flags.DEFINE_float("truncation", None, "Truncation trick (T > 0): latent entries beyond |T| "
                   f"are redrawn within [-T, T], in {', '.join(LATENT_MODES)}.")
flags.DEFINE_list("truncations", None, "The truncation mode's values of T, one column each "
                  f"after the untruncated one; {','.join(map(str, DEFAULT_TRUNCATIONS))} "
                  "without it.")
FLAGS = flags.FLAGS
_latent_sequence = jax.jit(step_lib.latent_sequence, static_argnums=2)


def truncate_latents(z: jax.Array, seed: int | jax.Array, indices: jax.Array,
                     truncation: float | jax.Array) -> jax.Array:
    """Latents `z`, `indices` of the seed (`step.latent_sequence`), brought within
    [-truncation, truncation] by BigGAN's truncation trick: entries within it are kept, so
    image i stays comparable across truncations, and those beyond it are redrawn from the
    normal truncated there, keyed by (seed, i) alone, so that neither batch nor offset
    changes them."""
    key = jax.random.PRNGKey(seed)

    def redraw(i: jax.Array) -> jax.Array:
        image_key = jax.random.fold_in(jax.random.fold_in(key, i), TRUNCATION_STREAM)
        return jax.random.truncated_normal(image_key, -truncation, truncation, z.shape[1:],
                                           z.dtype)

    return jnp.where(jnp.abs(z) <= truncation, z, jax.vmap(redraw)(indices))


_truncate_latents = jax.jit(truncate_latents)


class SampleError(UserFacingError, ValueError):
    """A flag that does not fit the run, such as a class it does not have."""


class Sampler:
    """A restored generator that turns latents (and classes) into uint8 images."""

    def __init__(self, workdir: str, step: int | None = None, use_ema: bool = True,
                 mesh: Mesh | None = None):
        self.workdir = workdir
        self.config = checkpoints.read_run_config(workdir)
        self.mesh = mesh or parallel.make_mesh()
        manager = checkpoints.make_manager(workdir, read_only=True)
        abstract = step_lib.abstract_train_state(self.config, self.mesh, total_steps=1)
        self.state = checkpoints.restore(manager, abstract, step)
        self.step = int(parallel.fetch(self.state.step))
        self.use_ema = use_ema and self.state.ema is not None
        self._generate = jax.jit(functools.partial(
            step_lib.generate_images, config=self.config, use_ema=self.use_ema))
        self.num_classes = self.config.model.num_classes
        self.class_names = checkpoints.class_names(workdir, self.step, self.num_classes)

    def latents(self, seed: int, count: int, offset: int = 0,
                truncation: float | None = None) -> np.ndarray:
        """Latents `offset` to `offset + count` of the sequence that `seed` defines: image i
        of a seed is the same whatever the batch it is generated in; truncated to
        [-truncation, truncation] when given (`truncate_latents`)."""
        indices = jnp.arange(offset, offset + count)
        z = _latent_sequence(seed, indices, self.config.model.nz)
        if truncation is not None:
            z = _truncate_latents(z, seed, indices, truncation)
        return np.asarray(z)

    def classes(self, count: int, offset: int = 0,
                class_index: int | None = None) -> np.ndarray | None:
        """The classes of images `offset` to `offset + count` of a seed: all `class_index`,
        or class-balanced (`images.sample_classes`); None for an unconditional run."""
        return images.sample_classes(np.arange(offset, offset + count), self.num_classes,
                                     class_index)

    def check_class(self, index: int, flag: str) -> None:
        """Raises SampleError naming `flag` (as given, e.g. --class=12) unless `index` is
        one of the run's classes."""
        name = flag.split("=")[0]
        if not self.num_classes:
            raise SampleError(f"{name} applies to class-conditional runs, and this run's "
                              f"model is unconditional (config.model.num_classes=0); drop "
                              f"{name}")
        if not 0 <= index < self.num_classes:
            named = self.class_names != tuple(str(k) for k in range(self.num_classes))
            listed = (" (" + ", ".join(f"{k}: {n}" for k, n in enumerate(self.class_names))
                      + ")" if named and self.num_classes <= LISTED_CLASSES else "")
            raise SampleError(f"{flag}: class {index} is out of range; the run's classes are "
                              f"0 to {self.num_classes - 1}{listed}")

    def generate(self, z: np.ndarray, sharded: bool = False,
                 labels: np.ndarray | None = None) -> np.ndarray:
        """uint8 images of the latents, of the classes `labels` for a conditional run (int
        [N], or class weights [N, num_classes] that mix classes); `sharded` splits the batch
        over all devices."""
        sharding = (parallel.batch_sharded(self.mesh) if sharded
                    else parallel.replicated(self.mesh))
        on_devices = [None if x is None else jax.device_put(jnp.asarray(x), sharding)
                      for x in (z, labels)]
        out = self._generate(self.state, on_devices[0], labels=on_devices[1])
        return images.to_uint8(np.asarray(jax.device_get(out)))


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation, falling back to linear for (anti)parallel vectors."""
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def interpolation_path(points: np.ndarray, frames: int, method: str) -> np.ndarray:
    """Latents from points[0] to points[-1], `frames` per segment, both ends included."""
    mix: Callable[[np.ndarray, np.ndarray, float], np.ndarray] = (
        slerp if method == "slerp" else lambda a, b, t: (1 - t) * a + t * b)
    path = [mix(a, b, i / frames) for a, b in itertools.pairwise(points) for i in range(frames)]
    return np.stack(path + [points[-1]]).astype(np.float32)


def path_labels(key_classes: np.ndarray | None, frames: int,
                num_classes: int) -> np.ndarray | None:
    """The classes along a path through key points of classes `key_classes` (None when
    unconditional), `frames` per segment: int labels while they are all one class, else
    class weights moving linearly from each key point's class to the next's."""
    if key_classes is None:
        return None
    if len(set(key_classes.tolist())) == 1:
        return np.full((len(key_classes) - 1) * frames + 1, key_classes[0], np.int32)
    one_hot = np.eye(num_classes, dtype=np.float32)[key_classes]
    return interpolation_path(one_hot, frames, "linear")


def segment_rows(path_images: np.ndarray, frames: int) -> np.ndarray:
    """The images of a whole path regrouped as one row per segment, each from its start key
    point to its end key point, so a grid of them reads left to right row by row; the inner
    key points end one row and start the next."""
    return np.concatenate([path_images[i:i + frames + 1]
                           for i in range(0, len(path_images) - 1, frames)])


def output_path(workdir: str, default_name: str) -> str:
    """--out, or WORKDIR/figures/default_name; its folder is created."""
    path = FLAGS.out or os.path.join(workdir, workdir_lib.FIGURES_DIR, default_name)
    paths.make_dirs(os.path.dirname(paths.absolute(path)))
    return path


def make_grid_figure(sampler: Sampler, seed: int, rows: int, cols: int,
                     class_index: int | None = None,
                     truncation: float | None = None) -> np.ndarray:
    count = rows * cols
    return images.make_grid(sampler.generate(
        sampler.latents(seed, count, truncation=truncation),
        labels=sampler.classes(count, class_index=class_index)), rows)


def make_classes_figure(sampler: Sampler, seed: int, cols: int,
                        truncation: float | None = None) -> np.ndarray:
    """A row per class in class order, column j of latent j of the seed in every row: a
    column shows one latent across the classes."""
    z = sampler.latents(seed, cols, truncation=truncation)
    rows = [sampler.generate(z, labels=np.full(cols, label, np.int32))
            for label in range(sampler.num_classes)]  # a row at a time: one compilation
    return images.make_grid(np.concatenate(rows), sampler.num_classes)


def make_truncation_figure(sampler: Sampler, seed: int, rows: int,
                           truncations: Sequence[float]) -> np.ndarray:
    """Row i image i of the seed (class-balanced), untruncated in the first column and then
    at each of `truncations`: a row shows what each truncation trades for fidelity."""
    labels = sampler.classes(rows)
    columns = [sampler.generate(sampler.latents(seed, rows, truncation=truncation),
                                labels=labels)
               for truncation in (None, *truncations)]  # a column at a time: one compilation
    return images.make_grid(np.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:]), rows)


def write_files(sampler: Sampler, folder: str, num: int, seed: int, batch_size: int,
                class_index: int | None = None, truncation: float | None = None) -> None:
    from tqdm import tqdm
    devices = jax.device_count()
    batch_size = -(-batch_size // devices) * devices
    paths.make_dirs(folder)
    with tqdm(total=num, unit="img", desc=f"writing {folder}") as progress:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            # Full batches: one compilation.
            z = sampler.latents(seed, batch_size, offset=start, truncation=truncation)
            labels = sampler.classes(batch_size, offset=start, class_index=class_index)
            for i, image in enumerate(sampler.generate(z, sharded=True, labels=labels)[:count]):
                images.save_png(os.path.join(folder, f"{start + i:06d}.png"), image)
            progress.update(count)


def write_walk(walk: np.ndarray, frames: int, fps: float, name: str) -> list[str]:
    """`name`.png, a row per segment of the path's images `walk` (`segment_rows`), and
    `name`.gif walking the whole path there and back; returns both paths."""
    images.save_png(f"{name}.png",
                    images.make_grid(segment_rows(walk, frames), (len(walk) - 1) // frames))
    ping_pong = list(walk) + list(walk[-2:0:-1])  # loops without repeated frames
    images.save_gif(f"{name}.gif", ping_pong, fps)
    return [f"{name}.png", f"{name}.gif"]


def write_interpolations(sampler: Sampler, seed: int, points: int, frames: int, fps: float,
                         prefix: str, class_index: int | None = None,
                         truncation: float | None = None) -> list[str]:
    """Per method, a PNG of `points - 1` rows of `frames + 1` images and a GIF walking the
    whole path there and back; the paths of both methods pass through the same key points,
    images 0 to points - 1 of the seed (truncated at `truncation`). A conditional run's path
    stays in class `class_index`, or else moves from each key point's class to the next's
    too."""
    ends = sampler.latents(seed, points, truncation=truncation)
    labels = path_labels(sampler.classes(points, class_index=class_index), frames,
                         sampler.num_classes)
    written = []
    for method in ("linear", "slerp"):
        walk = sampler.generate(interpolation_path(ends, frames, method), labels=labels)
        written += write_walk(walk, frames, fps, f"{prefix}_{method}")
    return written


def write_class_interpolation(sampler: Sampler, seed: int, classes: list[int], frames: int,
                              fps: float, prefix: str,
                              truncation: float | None = None) -> list[str]:
    """At latent 0 of the seed, from class classes[0] to classes[1] (and on), the class
    weights moving linearly: a PNG with a row per pair of classes and a GIF."""
    labels = path_labels(np.asarray(classes, np.int32), frames, sampler.num_classes)
    z = np.repeat(sampler.latents(seed, 1, truncation=truncation), len(labels), axis=0)
    return write_walk(sampler.generate(z, labels=labels), frames, fps,
                      f"{prefix}_classes_{'-'.join(map(str, classes))}")


def write_training_gif(workdir: str, path: str, fps: float, ema: bool) -> int:
    """The run's sample grids as a GIF: the EMA ones when asked for and present."""
    grids = paths.glob(os.path.join(workdir, workdir_lib.SAMPLES_DIR), "step_*.png")
    averaged = [p for p in grids if p.endswith("_ema.png")]
    frames = averaged if ema and averaged else [p for p in grids if p not in averaged]
    if not frames:
        raise checkpoints.CheckpointError(
            f"no sample grids in {os.path.join(workdir, 'samples')}; train first")
    images.save_gif(path, [iio.imread(paths.read_bytes(p)) for p in frames], fps)
    return len(frames)


def write_real_vs_fake(sampler: Sampler, path: str, seed: int, side: int,
                       class_index: int | None = None,
                       truncation: float | None = None) -> None:
    """Dataset images beside samples; a conditional run's real images are of the samples'
    classes, image for image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcgan_jax import data
    config = sampler.config
    source = data.open_source(config.dataset, config.data.cache_dir, config.data.tfds_data_dir,
                              config.data.label_key)
    count = side * side
    real, _ = data.sample_images(config, source, count,
                                 classes=sampler.classes(count, class_index=class_index))
    fake = make_grid_figure(sampler, seed, side, side, class_index, truncation)
    of_class = "" if class_index is None else f", class {sampler.class_names[class_index]}"
    truncated = "" if truncation is None else f", truncation {truncation:g}"
    figure, axes = plt.subplots(1, 2, figsize=(12, 6.4))
    for ax, grid, title in ((axes[0], images.make_grid(real, side), f"Real images{of_class}"),
                            (axes[1], fake,
                             f"Generated{of_class}{truncated}, step {sampler.step}")):
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    figure.tight_layout()
    images.save_figure(figure, path, dpi=100)
    plt.close(figure)


def _pixel_vectors(batch: np.ndarray) -> np.ndarray:
    """uint8 images as float32 rows in [0, 1]: the pixel space of `nearest_training_images`."""
    return batch.reshape(len(batch), -1).astype(np.float32) / 255.0


def _keep_nearest(best: dict[str, np.ndarray] | None, distances: np.ndarray,
                  indices: np.ndarray, offset: int, vectors: np.ndarray, batch: np.ndarray,
                  k: int) -> dict[str, np.ndarray]:
    """The k nearest of the running `best` and of a batch of training images that starts at
    `offset` in the pool (`indices` into the batch, [rows, k] each), with their vectors and
    images; ties go to the earlier training image."""
    found = {"distances": distances, "indices": indices + offset, "vectors": vectors[indices],
             "images": batch[indices]}
    if best is not None:
        found = {key: np.concatenate([best[key], found[key]], axis=1) for key in found}
    order = np.argsort(found["distances"], axis=1, kind="stable")[:, :k]
    return {key: np.take_along_axis(value, order.reshape(order.shape + (1,) * (value.ndim - 2)),
                                    axis=1) for key, value in found.items()}


def nearest_training_images(sampler: Sampler, seed: int, rows: int, k: int, pool: int,
                            truncation: float | None = None) -> dict[str, Any]:
    """Images 0 to rows - 1 of the seed (class-balanced, as `grid` draws them) and, for each,
    its k nearest among the first `pool` training images (all when 0) in evaluation order,
    as training sees them (cropped and resized, never flipped): by Inception features (the
    run's config.eval weights and dims) and by pixels in [0, 1], both Euclidean.

    The question after a good FID on small data is whether G copied its training set: a
    copy sits at distance about 0 in both spaces. The pool is read a batch at a time and
    only the running nearest are kept, so any pool fits in memory.

    Returns {"generated": uint8 [rows, H, W, C], "classes": int [rows] or None, "pool": the
    training images searched, "inception" and "pixels": {"indices": [rows, k] positions in
    the pool (unreadable files skipped), "distances": [rows, k] ascending, "images": uint8
    [rows, k, H, W, C]}}.
    """
    from dcgan_jax import data
    from dcgan_jax.evaluation import quality
    from dcgan_jax.evaluation.evaluator import feature_extractor
    if rows < 1 or k < 1 or pool < 0:
        raise SampleError(f"the nearest figure needs at least one generated image and one "
                          f"training image per space, and a pool of 0 (all) or more; got "
                          f"rows={rows}, k={k}, pool={pool}")
    if 0 < pool < k:
        raise SampleError(f"--num={pool} training images cannot give --cols={k} nearest "
                          f"ones; give --num={k} or more (0 searches them all)")
    config = sampler.config
    source = data.open_source(config.dataset, config.data.cache_dir, config.data.tfds_data_dir,
                              config.data.label_key)
    classes = sampler.classes(rows)
    generated = sampler.generate(sampler.latents(seed, rows, truncation=truncation),
                                 labels=classes)
    extractor = feature_extractor(config, sampler.mesh)

    def inception(batch: np.ndarray) -> np.ndarray:
        return extractor.of_batches([batch])

    spaces = {"inception": inception, "pixels": _pixel_vectors}
    queries = {space: vectors(generated) for space, vectors in spaces.items()}
    best: dict[str, Any] = dict.fromkeys(spaces)
    count = min(pool or len(source), len(source))
    searched = 0
    for batch in data.evaluation_batches(config, source, count, extractor.batch_size):
        pool_images = batch["image"]
        for space, vectors in spaces.items():
            references = vectors(pool_images)
            distances, indices = quality.nearest_distances(
                queries[space], references, k=min(k, len(references)))
            best[space] = _keep_nearest(best[space], distances, indices, searched, references,
                                        pool_images, k)
        searched += len(pool_images)
    if searched < k:
        raise SampleError(f"{config.dataset} gave {searched} readable training images of the "
                          f"{count} searched; --cols={k} nearest need at least {k}")
    result: dict[str, Any] = {"generated": generated, "classes": classes, "pool": searched}
    for space, found in best.items():
        # Exact distances of the k kept (the blocked search rounds near-0 ones), re-sorted.
        distances = np.linalg.norm(found["vectors"].astype(np.float64)
                                   - queries[space][:, None].astype(np.float64), axis=-1)
        order = np.argsort(distances, axis=1, kind="stable")
        result[space] = {
            "indices": np.take_along_axis(found["indices"], order, axis=1),
            "distances": np.take_along_axis(distances, order, axis=1),
            "images": np.take_along_axis(found["images"],
                                         order.reshape(order.shape + (1, 1, 1)), axis=1)}
    return result


def write_nearest_figure(found: dict[str, Any], path: str, title: str,
                         class_names: Sequence[str] = ()) -> None:
    """One row per generated image: [generated | k nearest by Inception | k nearest by
    pixels], three groups apart, each neighbour captioned with its pool index and distance:
    a copy of a training image shows as the same image at about 0 in both groups."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, k = found["inception"]["indices"].shape
    figure = plt.figure(figsize=(1.1 * (1 + 2 * k) + 1.0, 1.3 * rows + 0.9),
                        layout="constrained")
    figure.suptitle(title)
    groups = figure.subfigures(1, 3, width_ratios=[1, k, k], wspace=0.08)
    classes = found["classes"]
    contents = [("generated", found["generated"][:, None],
                 [[f"class {class_names[c]}" if classes is not None else ""]
                  for c in (classes if classes is not None else range(rows))])]
    for space, heading, _ in NEAREST_SPACES:
        near = found[space]
        contents.append((heading, near["images"], [
            [f"#{i}: {d:.3g}" for i, d in zip(indices, distances, strict=True)]
            for indices, distances in zip(near["indices"], near["distances"], strict=True)]))
    for group, (heading, tiles, captions) in zip(groups, contents, strict=True):
        group.suptitle(heading)
        axes = group.subplots(rows, tiles.shape[1], squeeze=False)
        for row in range(rows):
            for col in range(tiles.shape[1]):
                ax, tile = axes[row, col], tiles[row, col]
                ax.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap="gray",
                          vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlabel(captions[row][col], fontsize=7, labelpad=2)
    images.save_figure(figure, path, dpi=100)
    plt.close(figure)


def _json_line(line: str) -> object:
    """A line of metrics.jsonl; None for one that a crash left half-written."""
    try:
        return json.loads(line)
    except ValueError:
        return None


def read_metrics(workdir: str, key: str, absent: str = "", kind: str = "") -> list[dict]:
    """The rows of metrics.jsonl that hold `key`: loss_d for training, eval_seconds for
    evaluations (`kind` names them, `absent` tells what to do when there are none)."""
    path = os.path.join(workdir, workdir_lib.METRICS_FILE)
    if not paths.is_file(path):
        raise checkpoints.CheckpointError(f"{path} does not exist; train first")
    rows = [row for line in paths.read_text(path).splitlines()
            if isinstance(row := _json_line(line), dict) and key in row]
    if not rows:
        raise checkpoints.CheckpointError(f"{path} holds no {kind or key + ' values'}{absent}")
    return rows


def write_plot(workdir: str, path: str) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(workdir, "loss_d")
    steps = [r["step"] for r in rows]
    figure, (losses, outputs) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    losses.plot(steps, [r["loss_d"] for r in rows], label="loss D")
    losses.plot(steps, [r["loss_g"] for r in rows], label="loss G")
    losses.set_ylabel("loss")
    # Runs logged before d_output was written were all of the probability kind.
    kind = rows[-1].get("d_output", PROBABILITY)
    d = D_OUTPUT_NAMES[kind]
    outputs.plot(steps, [r["d_real"] for r in rows], label=f"{d}(x)")
    outputs.plot(steps, [r["d_fake_before"] for r in rows], label=f"{d}(G(z)) before D update")
    outputs.plot(steps, [r["d_fake_after"] for r in rows], label=f"{d}(G(z)) after D update")
    outputs.set_ylabel(f"D output ({kind})")
    outputs.set_xlabel("step")
    for ax in (losses, outputs):
        ax.legend()
        ax.grid(alpha=0.3)
    figure.tight_layout()
    images.save_figure(figure, path, dpi=100)
    plt.close(figure)
    return len(rows)


# The panels of the evaluations' plot, in order: (value, its spread if any, axis label).
EVALUATION_PANELS = (
    ("fid", None, "FID (lower is better)"), ("kid", "kid_std", "KID (mean ± std over subsets)"),
    ("is", "is_std", "Inception Score (mean ± std over splits)"),
    ("precision", None, "precision"), ("recall", None, "recall"), ("density", None, "density"),
    ("coverage", None, "coverage"), ("memorisation", None, "memorisation (about 0.01: none)"))


def write_fid_plot(workdir: str, path: str) -> tuple[int, dict, str]:
    """A panel per metric the evaluations computed (config.eval.metrics), over steps, the best
    value of config.eval.best_metric marked; returns the count of evaluations, the best row
    and the metric it is best by."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(workdir, "eval_seconds", absent=(
        ": the run was trained without evaluations. Train with --config.eval.every=N (N > 0; "
        "the FID weights are fetched once, or given by --config.eval.fid_weights=PATH), or "
        f"score a checkpoint with python -m dcgan_jax.evaluate --workdir={workdir}"),
        kind="evaluations")
    panels = [panel for panel in EVALUATION_PANELS if any(panel[0] in r for r in rows)]
    if not panels:
        raise checkpoints.CheckpointError(f"the evaluations in {workdir} hold no metric values")
    names = [name for name, _, _ in panels]
    try:  # the run's ranking of checkpoints, when it computed that value
        ranked = checkpoints.read_run_config(workdir).eval.best_metric
    except checkpoints.CheckpointError:
        ranked = None
    ranked = ranked if ranked in names else names[0]
    rank = checkpoints.ranking(ranked)
    best = min((r for r in rows if ranked in r), key=rank)
    columns = min(len(panels), 4)
    lines = -(-len(panels) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.5 * columns + 1, 4 * lines),
                                squeeze=False)
    for ax, (name, spread, label) in zip(axes.flat, panels, strict=False):
        having = [r for r in rows if name in r]  # eval.metrics may change on resume
        steps, values = [r["step"] for r in having], [r[name] for r in having]
        if spread:
            ax.errorbar(steps, values, yerr=[r.get(spread, 0.0) for r in having], marker="o",
                        capsize=3)
        else:
            ax.plot(steps, values, marker="o")
        if name == ranked:
            ax.scatter([best["step"]], [best[name]], s=120, facecolors="none",
                       edgecolors="red", label=f"best: {best[name]:.4g} at step {best['step']}")
            ax.legend()
        ax.set_ylabel(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.tight_layout()
    images.save_figure(figure, path, dpi=100)
    plt.close(figure)
    return len(rows), best, ranked


def between_classes() -> list[int] | None:
    """The classes of --between_classes; None when it is not given or not class numbers."""
    try:
        return [int(value) for value in FLAGS.between_classes or ()] or None
    except ValueError:
        return None


def class_flags_problem(mode: str) -> str | None:
    """The first problem with --class and --between_classes for `mode`, or None; whether
    the run has those classes is checked once it is read (`Sampler.check_class`)."""
    class_index, between = FLAGS["class"].value, FLAGS.between_classes
    if class_index is not None and mode not in CLASS_MODES:
        return (f"--class applies to {', '.join(CLASS_MODES[:-1])} and {CLASS_MODES[-1]}, "
                f"not {mode}")
    if between is None:
        return None
    if mode != "interpolate":
        return f"--between_classes applies to interpolate, not {mode}"
    if class_index is not None:
        return "give --class=K (a path within class K) or --between_classes, not both"
    if between_classes() is None or len(between) < 2:
        return (f"--between_classes={','.join(between)} must be two or more class numbers "
                f"separated by commas, e.g. --between_classes=3,5")
    return None


def truncation_values() -> list[float] | None:
    """The values of --truncations (DEFAULT_TRUNCATIONS without it); None unless they are
    all numbers above 0."""
    if FLAGS.truncations is None:
        return list(DEFAULT_TRUNCATIONS)
    try:
        values = [float(value) for value in FLAGS.truncations]
    except ValueError:
        return None
    return values if values and all(value > 0 for value in values) else None


def truncation_flags_problem(mode: str) -> str | None:
    """The first problem with --truncation and --truncations for `mode`, or None."""
    truncation = FLAGS.truncation
    if truncation is not None and mode not in LATENT_MODES:
        its_own = "; its values are --truncations" if mode == "truncation" else ""
        return (f"--truncation applies to {', '.join(LATENT_MODES[:-1])} and "
                f"{LATENT_MODES[-1]}, not {mode}{its_own}")
    if truncation is not None and not truncation > 0:  # NaN too
        return f"--truncation={truncation:g} must be above 0"
    if FLAGS.truncations is not None and mode != "truncation":
        return f"--truncations applies to truncation, not {mode}"
    if mode == "truncation" and truncation_values() is None:
        return (f"--truncations={','.join(FLAGS.truncations)} must be numbers above 0 "
                f"separated by commas, e.g. --truncations=1,0.5")
    return None


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in MODES:
        sys.exit(f"dcgan_jax.sample: error: give one mode of {', '.join(MODES)} "
                 f"(got {' '.join(argv[1:]) or 'none'})")
    if not FLAGS.workdir:
        sys.exit("dcgan_jax.sample: error: --workdir is required")
    cli.set_up_process()
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax warns about read-only managers
    for name in ("rows", "cols", "num", "batch_size", "frames"):
        least = 0 if name == "num" and argv[1] == "nearest" else 1  # 0: all training images
        if FLAGS[name].value < least:
            sys.exit(f"dcgan_jax.sample: error: --{name}={FLAGS[name].value} must be at least "
                     f"{least}")
    if FLAGS.points < 2:
        sys.exit(f"dcgan_jax.sample: error: --points={FLAGS.points} must be at least 2")
    mode, workdir = argv[1], FLAGS.workdir
    if problem := class_flags_problem(mode) or truncation_flags_problem(mode):
        sys.exit(f"dcgan_jax.sample: error: {problem}")
    try:
        run_mode(mode, workdir, not FLAGS.no_ema, FLAGS["class"].value, between_classes())
    except UserFacingError as error:
        sys.exit(f"dcgan_jax.sample: error: {error}")


def run_mode(mode: str, workdir: str, ema: bool, class_index: int | None,
             between: list[int] | None) -> None:
    """Writes the figure or files of `mode`, and prints where."""
    if mode == "gif":
        path = output_path(workdir, "training.gif")
        print(f"{path}: {write_training_gif(workdir, path, FLAGS.fps, ema)} frames")
        return
    if mode == "plot":
        path = output_path(workdir, "losses.png")
        print(f"{path}: {write_plot(workdir, path)} logged steps")
        return
    if mode == "fid":
        path = output_path(workdir, "fid.png")
        count, best, name = write_fid_plot(workdir, path)
        from dcgan_jax.evaluation import metrics
        print(f"{path}: {count} evaluations; best {metrics.METRIC_LABELS[name]} "
              f"{metrics.format_value(name, best[name])} at step {best['step']}")
        return
    sampler = Sampler(workdir, FLAGS.step, ema)
    if class_index is not None:
        sampler.check_class(class_index, f"--class={class_index}")
    for label in between or ():
        sampler.check_class(label, f"--between_classes={','.join(map(str, between))}")
    if mode == "classes" and not sampler.num_classes:
        raise SampleError("the classes mode shows a class-conditional run's classes, and this "
                          "run's model is unconditional (config.model.num_classes=0)")
    truncation = FLAGS.truncation
    tag = (f"step{sampler.step}{'_ema' if sampler.use_ema else ''}_seed{FLAGS.seed}"
           f"{'' if class_index is None else f'_class{class_index}'}"
           f"{'' if truncation is None else f'_trunc{truncation:g}'}")
    if mode == "summary":
        from dcgan_jax import reporting
        print(f"{workdir}, step {sampler.step}",
              reporting.parameter_table("Generator", sampler.state.g.params),
              reporting.parameter_table("Discriminator", sampler.state.d.params), sep="\n")
    elif mode == "files":
        folder = FLAGS.out or os.path.join(workdir, workdir_lib.FIGURES_DIR, f"files_{tag}")
        write_files(sampler, folder, FLAGS.num, FLAGS.seed, FLAGS.batch_size, class_index,
                    truncation)
        if class_index is not None:
            print(f"{folder}: {FLAGS.num} images of class {class_index} "
                  f"({sampler.class_names[class_index]})")
        elif sampler.num_classes:
            print(f"{folder}: {FLAGS.num} images, class-balanced (image i of class i mod "
                  f"{sampler.num_classes})")
        else:
            print(f"{folder}: {FLAGS.num} images")
    elif mode == "grid":
        path = output_path(workdir, f"grid_{tag}.png")
        images.save_png(path, make_grid_figure(sampler, FLAGS.seed, FLAGS.rows, FLAGS.cols,
                                               class_index, truncation))
        print(path)
    elif mode == "classes":
        path = output_path(workdir, f"classes_{tag}.png")
        images.save_png(path, make_classes_figure(sampler, FLAGS.seed, FLAGS.cols, truncation))
        print(path)
        for label, name in enumerate(sampler.class_names):
            print(f"row {label}: {name}")
    elif mode == "truncation":
        path = output_path(workdir, f"truncation_{tag}.png")
        values = truncation_values()
        images.save_png(path, make_truncation_figure(sampler, FLAGS.seed, FLAGS.rows, values))
        print(path)
        print("column 0: untruncated")
        for column, value in enumerate(values, 1):
            print(f"column {column}: truncation {value:g}")
    elif mode == "interpolate":
        prefix = output_path(workdir, f"interpolate_{tag}")
        prefix = prefix[:-4] if prefix.endswith((".png", ".gif")) else prefix
        written = (write_class_interpolation(sampler, FLAGS.seed, between, FLAGS.frames,
                                             FLAGS.fps, prefix, truncation) if between else
                   write_interpolations(sampler, FLAGS.seed, FLAGS.points, FLAGS.frames,
                                        FLAGS.fps, prefix, class_index, truncation))
        print("\n".join(written))
    elif mode == "real_vs_fake":
        path = output_path(workdir, f"real_vs_fake_{tag}.png")
        write_real_vs_fake(sampler, path, FLAGS.seed, FLAGS.rows, class_index, truncation)
        print(path)
    elif mode == "nearest":
        write_nearest(sampler, output_path(workdir, f"nearest_{tag}.png"), truncation)


def write_nearest(sampler: Sampler, path: str, truncation: float | None) -> None:
    """The nearest figure of the flags, and its printed lines: the path, what was searched,
    and per row each space's nearest training image and distance."""
    k = NEAREST_COLS if FLAGS["cols"].using_default_value else FLAGS.cols
    found = nearest_training_images(sampler, FLAGS.seed, FLAGS.rows, k, FLAGS.num, truncation)
    truncated = "" if truncation is None else f", truncation {truncation:g}"
    write_nearest_figure(found, path, f"step {sampler.step}, seed {FLAGS.seed}{truncated}: "
                         f"nearest of {found['pool']:,} training images",
                         sampler.class_names if sampler.num_classes else ())
    print(path)
    print(f"nearest of the first {found['pool']:,} training images of {sampler.config.dataset} "
          f"(evaluation order), Euclidean: {sampler.config.eval.dims}-d Inception features, "
          f"pixels in [0, 1]")
    for row in range(FLAGS.rows):
        of_class = ("" if found["classes"] is None
                    else f" (class {sampler.class_names[found['classes'][row]]})")
        print(f"row {row}{of_class}: " + ", ".join(
            f"{name} {found[space]['distances'][row, 0]:.4g} (#{found[space]['indices'][row, 0]})"
            for space, _, name in NEAREST_SPACES))


if __name__ == "__main__":
    app.run(main)
