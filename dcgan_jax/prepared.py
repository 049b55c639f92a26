"""Prepared data: every image of a source decoded once into one uint8 array on disk, and
whole training batches served from it.

Decoding, cropping and Lanczos-resizing a JPEG costs about a millisecond of CPU; a GPU step
eats tens of thousands of images a second. So each process's shard of a dataset is decoded
once, at the training resolution, channels and crop, into

    CACHE/prepared/NAME-KEY/images.u8    N x R x R x C uint8, rows in source order
    CACHE/prepared/NAME-KEY/labels.i32   N little-endian int32, each row's class (labelled
                                         sources only: meta.json's "classes" not empty)
    CACHE/prepared/NAME-KEY/meta.json    shape, classes, source fingerprint, unreadable files

KEY names what the images are (dataset, resolution, channels, crop, shard); meta.json's
fingerprint names the source's content and labels (`Source.fingerprint`: folders, every
file's path, so its class, size, mtime and ctime; tfds: name, version, split, size and label
feature). A changed source is noticed and prepared again. A folder appears under its final
name only once complete (written aside as NAME-KEY.partial-HOST-PID, then renamed), and the
size of its files is checked on every open, so an interrupted or truncated preparation is
never read as images; what a killed process left aside is removed by the next one on its
host. An unreadable file is left out with its label, so rows and labels stay paired.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tqdm

from dcgan_jax.errors import UserFacingError

FORMAT_VERSION = 2  # 2: labels.i32 and meta.json's "classes"
IMAGES_FILE = "images.u8"
LABELS_FILE = "labels.i32"
LABEL_DTYPE = np.dtype("<i4")
META_FILE = "meta.json"
# Unreadable files named in meta.json and in the warning; the count is always complete.
UNREADABLE_EXAMPLES = 20
# Records decoded per grain element while preparing: large enough that grain's per-element
# cost vanishes, small enough to keep every worker busy.
PREPARE_CHUNK = 256


class PreparedDataError(UserFacingError, ValueError):
    """Prepared data cannot be written or read."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which rows of a source one process trains on: source[index::count]."""

    index: int = 0
    count: int = 1


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Consecutive records, decoded: the readable ones' images and labels (None when the
    source is unlabelled), in source order, and the paths of the unreadable ones."""

    images: np.ndarray
    labels: np.ndarray | None
    unreadable: list[str]


def describe_change(old: dict[str, Any], count: int) -> str:
    if old.get("source_count") != count:
        return f"{old.get('source_count')} records when prepared, {count} now"
    return "files were modified since it was prepared"


def folder_name(location: str, resolution: int, channels: int, crop: str,
                shard: Shard) -> str:
    """NAME-KEY: readable, and unique for what the images are; `location` is the source's
    (`Source.location`: config.dataset with any path made absolute)."""
    identity = json.dumps({"dataset": location, "resolution": resolution,
                           "channels": channels, "crop": crop, "shard": [shard.index,
                                                                         shard.count],
                           "format": FORMAT_VERSION}, sort_keys=True)
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.-]+", "_", location.rstrip("/").split("/")[-1].split(":")[-1])
    shard_text = f"-shard{shard.index}of{shard.count}" if shard.count > 1 else ""
    return f"{name[:40]}-{resolution}x{channels}{shard_text}-{key}"


@dataclasses.dataclass
class PreparedImages:
    """An opened prepared folder: `images` and `labels` (None when unlabelled) are
    read-only memory maps."""

    path: str
    images: np.ndarray
    labels: np.ndarray | None
    meta: dict[str, Any]

    @property
    def unreadable_message(self) -> str | None:
        count = self.meta["unreadable_count"]
        if not count:
            return None
        examples = self.meta["unreadable"]
        return (f"{count} unreadable image file(s) were left out when the data was "
                f"prepared, e.g. {', '.join(examples[:5])}")


def _memmap(path: str, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The file `path` of `shape` items, read-only; raises if it does not hold them all."""
    expected = int(np.prod(shape)) * dtype.itemsize
    size = os.path.getsize(path) if os.path.isfile(path) else -1
    if size != expected:
        raise PreparedDataError(f"{path} holds {max(size, 0):,} bytes, not the "
                                f"{expected:,} of {shape[0]:,} {what}: it is truncated")
    return np.memmap(path, dtype, mode="r", shape=shape) if expected else np.zeros(shape, dtype)


def open_prepared(path: str) -> PreparedImages:
    """Opens a complete prepared folder; raises PreparedDataError if it is incomplete."""
    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
        shape = tuple(meta["shape"])
        labelled = bool(meta.get("classes"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PreparedDataError(f"{path} has no readable {META_FILE} ({error})") from None
    images = _memmap(os.path.join(path, IMAGES_FILE), np.dtype(np.uint8), shape, "images")
    labels = (_memmap(os.path.join(path, LABELS_FILE), LABEL_DTYPE, shape[:1], "labels")
              if labelled else None)
    return PreparedImages(path, images, labels, meta)


def _write(path: str, chunks: Iterable[Chunk], total: int, image_shape: tuple[int, ...],
           meta: dict[str, Any], progress: Callable[[int], None]) -> None:
    """Writes the folder aside, then renames it into place; labels when meta["classes"]."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    partial = f"{path}.partial-{_owner()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    written, unreadable = 0, []
    labelled = bool(meta.get("classes"))
    try:
        with contextlib.ExitStack() as files:
            images_file = files.enter_context(open(os.path.join(partial, IMAGES_FILE), "wb"))
            labels_file = (files.enter_context(open(os.path.join(partial, LABELS_FILE), "wb"))
                           if labelled else None)
            for chunk in chunks:
                images_file.write(np.ascontiguousarray(chunk.images).tobytes())
                if labels_file is not None:
                    labels_file.write(np.asarray(chunk.labels, LABEL_DTYPE).tobytes())
                written += len(chunk.images)
                unreadable.extend(chunk.unreadable)
                progress(len(chunk.images) + len(chunk.unreadable))
            for f in filter(None, (images_file, labels_file)):
                f.flush()
                os.fsync(f.fileno())
        meta = {**meta, "shape": [written, *image_shape], "unreadable_count": len(unreadable),
                "unreadable": unreadable[:UNREADABLE_EXAMPLES],
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname()}
        with open(os.path.join(partial, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if written != total - len(unreadable):
            raise PreparedDataError(f"preparation of {path} read {written + len(unreadable)} "
                                    f"of {total} records")
        _replace_folder(partial, path)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        reason = ("the disk is full" if error.errno == errno.ENOSPC
                  else error.strerror or str(error))
        raise PreparedDataError(f"cannot write prepared data to {parent}: {reason}; free "
                                f"space or set config.data.cache_dir, or train with "
                                f"--config.data.prepared=off") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _replace_folder(partial: str, path: str) -> None:
    """Moves a complete folder into place; an old one there is moved aside, then removed.

    If another process finished the same folder first, its copy is kept.
    """
    stale = None
    if os.path.exists(path):
        stale = f"{path}.stale-{_owner()}"
        os.replace(path, stale)
    try:
        os.replace(partial, path)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(partial, ignore_errors=True)
    if stale:
        shutil.rmtree(stale, ignore_errors=True)


def _owner() -> str:
    """HOST-PID, the suffix of the folders this process writes aside."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process; not a process id
        return False
    return False


def remove_abandoned(folder: str, say: Callable[[str], None]) -> None:
    """Removes the NAME.partial-HOST-PID and NAME.stale-HOST-PID folders in `folder` that a
    process of this host left when it was killed. Another host's are kept: its processes
    cannot be seen from here."""
    try:
        names = os.listdir(folder)
    except OSError:  # none yet, or unreadable: writing there reports it
        return
    host = socket.gethostname()
    for name in sorted(names):
        match = re.fullmatch(r".+-[0-9a-f]{12}\.(?:partial|stale)-(.+)-(\d+)", name)
        if not match or match[1] != host or not _process_is_gone(int(match[2])):
            continue
        abandoned = os.path.join(folder, name)
        shutil.rmtree(abandoned, ignore_errors=True)
        if not os.path.exists(abandoned):
            say(f"Removed {abandoned}, left by process {match[2]} that is gone")


def prepare(path: str, records: Sequence[Any], decode_chunks: Callable[..., Iterable[Chunk]],
            meta: dict[str, Any], image_shape: tuple[int, ...],
            progress: Callable[[int], None] = lambda n: None) -> PreparedImages:
    """Decodes `records` with `decode_chunks(records)` (yielding a `Chunk` of consecutive
    records at a time) into the prepared folder `path`, and opens it. meta["classes"], the
    source's class names, says whether the chunks carry labels."""
    _write(path, decode_chunks(records), len(records), image_shape, meta, progress)
    return open_prepared(path)


def find_or_prepare(path: str, records: Sequence[Any], fingerprint: str,
                    decode_chunks: Callable[..., Iterable[Chunk]], meta: dict[str, Any],
                    image_shape: tuple[int, ...], say: Callable[[str], None],
                    progress: bool = False) -> PreparedImages:
    """The prepared folder at `path` if it is complete and of the current source; otherwise
    prepares it again, saying why in one line (with a progress bar when `progress` and
    stderr is a terminal). Folders left aside by killed processes are removed first."""
    remove_abandoned(os.path.dirname(path), say)
    reason = "not prepared yet"
    if os.path.exists(path):
        try:
            opened = open_prepared(path)
            if (opened.meta.get("fingerprint") == fingerprint
                    and opened.meta.get("format") == FORMAT_VERSION):
                return opened
            reason = (f"the source changed: {describe_change(opened.meta, meta['source_count'])}"
                      if opened.meta.get("format") == FORMAT_VERSION else "an older format")
        except PreparedDataError as error:
            reason = str(error)
    say(f"Preparing {len(records):,} records into {path} ({reason})")
    start = time.perf_counter()
    with tqdm.tqdm(total=len(records), unit="img", desc="preparing",
                   disable=None if progress else True) as bar:
        try:
            prepared = prepare(path, records, decode_chunks,
                               {**meta, "fingerprint": fingerprint, "format": FORMAT_VERSION},
                               image_shape, bar.update)
        except (KeyboardInterrupt, SystemExit):
            bar.disable = True  # not drawn again below the line that says why it stopped
            raise
    size = prepared.images.size
    say(f"Prepared {len(prepared.images):,} images ({size / 2**20:,.1f} MiB) in "
        f"{time.perf_counter() - start:.1f} s")
    return prepared


class BatchIterator:
    """Endless batches of `batch_size` images drawn without replacement from `images`,
    each with its row of `labels` when given: {"image": [batch_size, ...], "label": int32
    [batch_size]}.

    Each epoch is a permutation of every row, seeded by (seed, epoch); its last partial
    batch is dropped. A batch is read as `chunks` runs of sorted rows, so the memory map
    is read in order while every chunk (one D update's real batch) stays a random draw.
    The position (epoch, offset) is all its state; `get_state` and `set_state` carry it as
    JSON bytes, the form grain's orbax handler stores.
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, chunks: int = 1,
                 labels: np.ndarray | None = None):
        if len(images) < batch_size:
            raise PreparedDataError(f"{len(images)} prepared images are fewer than one "
                                    f"step needs ({batch_size})")
        self.images, self.batch_size, self.seed, self.chunks = images, batch_size, seed, chunks
        self.labels = labels
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.offset + self.batch_size > len(self.images):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        rows = self._order[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        rows = np.sort(rows.reshape(self.chunks, -1), axis=1).reshape(-1)
        if self.labels is None:
            return {"image": self.images[rows]}
        return {"image": self.images[rows], "label": np.asarray(self.labels[rows], np.int32)}

    def get_state(self) -> bytes:
        return json.dumps({"epoch": self.epoch, "offset": self.offset,
                           "rows": len(self.images), "batch_size": self.batch_size}).encode()

    def set_state(self, state: bytes) -> None:
        position = json.loads(state)
        if "rows" not in position:
            raise PreparedDataError("the checkpoint's data position was saved while decoding "
                                    "every epoch; resume with --config.data.prepared=off")
        if position["rows"] != len(self.images):
            raise PreparedDataError(
                f"the checkpoint's data position is for {position['rows']} prepared "
                f"images, but there are {len(self.images)} now: the dataset changed since "
                f"the checkpoint; train in a new workdir")
        self.epoch, self.offset = int(position["epoch"]), int(position["offset"])
        self._order = self._permutation(self.epoch)

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; nothing to start."""
