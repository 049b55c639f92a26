"""Batches of a source: shuffled, sharded per host, resumable, decoded in worker processes.

By default each process's shard is preprocessed once into the cache (`dcgan_jax.prepared`)
and whole batches are gathered from it; `data.prepared='off'` decodes every record in every
epoch in grain worker processes instead. Records that cannot be decoded are skipped with
their labels and counted instead of stopping the run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
from multiprocessing import resource_tracker
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
from absl import flags, logging

from dcgan_jax import paths, prepared, signals
from dcgan_jax.data.decode import Loader, loader_from_config
from dcgan_jax.data.sources import DataError, Source, local_cache_root

# What a batch holds for the train step, beside what the pipeline reports on.
BATCH_KEYS = ("image", "label")


def _batch_entries(element: dict[str, Any]) -> dict[str, Any]:
    return {key: element[key] for key in BATCH_KEYS if key in element}


class _SkipUnreadableIterator(grain.DatasetIterator):
    def __next__(self) -> dict[str, Any]:
        skipped, first = 0, ""
        while True:
            element = next(self._parent)
            if not element["unreadable"]:
                return {**_batch_entries(element), "skipped": np.int32(skipped),
                        "skipped_path": first}
            skipped += 1
            first = first or element["unreadable"]

    def get_state(self) -> Any:
        return self._parent.get_state()

    def set_state(self, state: Any) -> None:
        self._parent.set_state(state)


class SkipUnreadable(grain.IterDataset):
    """Drops unreadable records with their labels; each image carries how many were
    dropped just before it, so the count reaches the training process through the batches."""

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
    """`ds` run in `workers` processes.

    Grain (0.2.18, with jaxlib 0.11 or later) reads its flag
    --grain_enable_multiprocess_worker_profiling as it starts workers, not through the
    default-tolerant `config.get_or_default`, so it raises UnparsedFlagAccessError in a
    process whose absl flags were never parsed: an API caller's. Their flags are marked
    parsed here, leaving every value at its default; a command line parsed them already.
    """
    if workers == 0:
        return ds
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=buffer),
        worker_init_fn=signals.ignore_interrupts_in_worker)


# grain's default read-ahead checks a 500-slot buffer for every record.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=32)


@dataclasses.dataclass(frozen=True)
class _DecodeChunk:
    """Decodes records [index * size, (index + 1) * size) in a worker, into arrays."""

    records: Sequence[Any]
    loader: Loader
    size: int

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        elements = [self.loader(self.records[i]) for i in
                    range(index * self.size, min(len(self.records), (index + 1) * self.size))]
        return {key: np.stack([e[key] for e in elements]) for key in elements[0]}


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
                   workers: int) -> Iterator[prepared.Chunk]:
    """Consecutive chunks of `records`, in order, decoded by `workers` processes."""
    size = prepared.PREPARE_CHUNK
    ds = (grain.MapDataset.range(-(-len(records) // size))
          .map(_DecodeChunk(records, loader_from_config(config), size))
          .to_iter_dataset(READ_OPTIONS))
    iterator = iterate(grain.experimental.WithOptionsIterDataset(ds, _PICKLED_OUTPUTS),
                       workers, buffer=2)
    try:
        for chunk in iterator:
            bad = chunk["unreadable"] != ""
            yield prepared.Chunk(chunk["image"][~bad],
                                 chunk["label"][~bad] if "label" in chunk else None,
                                 [str(p) for p in chunk["unreadable"][bad]])
    finally:
        if isinstance(iterator, WorkerIterator):
            iterator.close()


def prepared_folder(config: Any, source: Source, shard_: prepared.Shard) -> str:
    name = prepared.folder_name(source.location, config.model.resolution,
                                config.model.channels, config.data.crop, shard_)
    return os.path.join(local_cache_root(config.data.cache_dir), "prepared", name)


def prepare_shard(config: Any, source: Source, shard_: prepared.Shard,
                  say: Callable[[str], None], workers: int | None = None,
                  progress: bool = False) -> prepared.PreparedImages:
    """This shard of the source decoded once into the cache (see `prepared`), with its
    labels, reused while the source is unchanged. Image files decode in one process per
    core."""
    records = shard(source, shard_.index, shard_.count)
    if workers is None:
        workers = ((os.cpu_count() or 1) if source.decode_in_workers
                   and len(records) > prepared.PREPARE_CHUNK else 0)
    shape = (config.model.resolution, config.model.resolution, config.model.channels)
    meta = {"dataset": config.dataset, "crop": config.data.crop, "source_count": len(source),
            "shard": [shard_.index, shard_.count], "classes": list(source.class_names)}
    if paths.is_remote(config.data.cache_dir):
        say(f"config.data.cache_dir={config.data.cache_dir} is a bucket: prepared data, "
            f"memory-mapped, stays on this host's disk under "
            f"{local_cache_root(config.data.cache_dir)}")
    return prepared.find_or_prepare(
        prepared_folder(config, source, shard_), records, source.fingerprint(),
        lambda r: decoded_chunks(config, r, workers), meta, shape, say, progress)


def make_pipeline(config: Any, source: Source, process_index: int,
                  process_count: int, say: Callable[[str], None] = print) -> Any:
    """Endless iterator of this process's batches for one step, with get_state/set_state.

    A batch is {"image": uint8 [records_per_step, H, W, C], "label": int32
    [records_per_step]}, "label" only when the source is labelled. Reshuffled every epoch
    from config.seed; its position is saved with each checkpoint, so a resumed run reads
    exactly the batches an unbroken run reads.

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
                                          chunks=config.train.d_steps, labels=images.labels)
        except prepared.PreparedDataError as error:
            raise DataError(f"config.dataset={config.dataset!r}: {error}") from None
    ds = (shard(source, process_index, process_count)
          .shuffle(seed=config.seed)
          .repeat()
          .map(loader_from_config(config))
          .to_iter_dataset(READ_OPTIONS))
    ds = SkipUnreadable(ds).batch(batch_size, drop_remainder=True)
    return iterate(ds, worker_count(config), config.data.prefetch)


def _images_of_classes(config: Any, source: Source, order: np.ndarray,
                       classes: np.ndarray) -> np.ndarray:
    """Image i of class classes[i]: the classes' readable images in `order`, each class's
    in turn, repeated when a class has fewer than asked for."""
    slots: dict[int, list[int]] = {}  # the indices i of each class
    for i, label in enumerate(classes.tolist()):
        if not 0 <= label < source.num_classes:
            raise DataError(f"class {label} was asked of config.dataset={config.dataset!r}, "
                            f"whose classes are 0 to {source.num_classes - 1}")
        slots.setdefault(label, []).append(i)
    loader = loader_from_config(config)
    found: dict[int, list[np.ndarray]] = {label: [] for label in slots}
    missing = len(classes)
    for index in order:
        record = source[int(index)]
        label = int(record["label"])
        if label in slots and len(found[label]) < len(slots[label]):
            element = loader(record)
            if not element["unreadable"]:
                found[label].append(element["image"])
                missing -= 1
                if not missing:
                    break
    if empty := [source.class_names[label] for label, images in found.items() if not images]:
        raise DataError(f"config.dataset={config.dataset!r} has no readable image of the "
                        f"class(es) {', '.join(empty)}")
    images = [None] * len(classes)
    for label, indices in slots.items():
        for rank, i in enumerate(indices):
            images[i] = found[label][rank % len(found[label])]
    return np.stack(images)


def sample_images(config: Any, source: Source, count: int,
                  classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """`count` readable images drawn at random (from config.seed), preprocessed, for
    figures, and their labels (None when the source is unlabelled).

    Drawn rather than taken from the start: some sources are sorted by class. With
    `classes` (int [count]), image i is drawn among the images of class classes[i]; a class
    with fewer readable images than asked for repeats them.
    """
    order = np.random.default_rng(config.seed).permutation(len(source))
    if classes is not None:
        classes = np.asarray(classes, np.int32)
        if classes.shape != (count,):
            raise ValueError(f"classes {classes.shape} must name one class for each of the "
                             f"{count} images")
        if not source.class_names:
            raise DataError(f"config.dataset={config.dataset!r} has no labels to draw "
                            f"images of given classes from")
        return _images_of_classes(config, source, order, classes), classes
    loader = loader_from_config(config)
    elements = []
    for index in order:
        element = loader(source[int(index)])
        if not element["unreadable"]:
            elements.append(element)
        if len(elements) == count:
            break
    images = np.stack([e["image"] for e in elements])
    if not source.class_names:
        return images, None
    return images, np.array([e["label"] for e in elements], np.int32)


# The order evaluation reads a dataset in: fixed, so cached statistics serve every run.
EVALUATION_SHUFFLE_SEED = 0


def evaluation_batches(config: Any, source: Source, count: int,
                       batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches {"image": uint8, "label": int32 (labelled sources)} of the first `count`
    records of a fixed shuffle of the whole dataset, preprocessed as for training but
    never flipped; unreadable files are left out.

    Every process reads all of them (reference statistics are computed once per dataset).
    """
    ds = (grain.MapDataset.source(source).shuffle(seed=EVALUATION_SHUFFLE_SEED)[:count]
          .map(loader_from_config(config))
          .to_iter_dataset(READ_OPTIONS))
    ds = SkipUnreadable(ds).batch(batch_size, drop_remainder=False)
    iterator = iterate(ds, worker_count(config), config.data.prefetch)
    try:
        for batch in iterator:
            yield _batch_entries(batch)
    finally:
        if isinstance(iterator, WorkerIterator):
            iterator.close()
