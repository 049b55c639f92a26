"""Prepared data: every image of a source decoded once into one uint8 array on disk, and
whole training batches served from it.

Decoding, cropping and Lanczos-resizing a JPEG costs about a millisecond of CPU; a GPU step
eats tens of thousands of images a second. So each process's shard of a dataset is decoded
once, at the training resolution, channels and crop, into

    CACHE/prepared/NAME-KEY/images.u8    N x R x R x C uint8, rows in source order
    CACHE/prepared/NAME-KEY/meta.json    shape, source fingerprint, unreadable files

KEY names what the images are (dataset, resolution, channels, crop, shard); meta.json's
fingerprint names the source's content (folders: every file's path, size, mtime and ctime;
tfds: name, version, split and size). A changed source is noticed and prepared again. A
folder appears under its final name only once complete (written aside as
NAME-KEY.partial-HOST-PID, then renamed), and its size is checked on every open, so an
interrupted or truncated preparation is never read as images; what a killed process left
aside is removed by the next one on its host.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from typing import Any, Callable, Sequence

import numpy as np
import tqdm

FORMAT_VERSION = 1
IMAGES_FILE = "images.u8"
META_FILE = "meta.json"
# Unreadable files named in meta.json and in the warning; the count is always complete.
UNREADABLE_EXAMPLES = 20
# Records decoded per grain element while preparing: large enough that grain's per-element
# cost vanishes, small enough to keep every worker busy.
PREPARE_CHUNK = 256


class PreparedDataError(ValueError):
    """Prepared data cannot be written or read."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which rows of a source one process trains on: source[index::count]."""

    index: int = 0
    count: int = 1


def source_fingerprint(dataset: str, source: Sequence[Any]) -> str:
    """A digest that changes whenever the images behind `source` may have changed. A file
    rewritten in place with its old mtime put back still has a new ctime."""
    digest = hashlib.sha256(dataset.encode())
    if len(source) and isinstance(source[0], str):  # image files
        for path in source:
            info = os.stat(path)
            digest.update(f"{path}\t{info.st_size}\t{info.st_mtime_ns}\t{info.st_ctime_ns}\n"
                          .encode())
    elif isinstance(source, np.ndarray):  # the demo digits
        digest.update(f"{source.shape}{source.dtype}".encode())
        digest.update(hashlib.sha256(source.tobytes()).digest())
    else:  # a tfds data source
        info = getattr(source, "dataset_info", None)
        name = info.full_name if info is not None else type(source).__name__
        digest.update(f"{name}\t{getattr(source, 'split', '')}\t{len(source)}".encode())
    return digest.hexdigest()


def describe_change(old: dict[str, Any], count: int) -> str:
    if old.get("source_count") != count:
        return f"{old.get('source_count')} records when prepared, {count} now"
    return "files were modified since it was prepared"


def folder_name(dataset: str, resolution: int, channels: int, crop: str,
                shard: Shard) -> str:
    """NAME-KEY: readable, and unique for what the images are."""
    identity = json.dumps({"dataset": _absolute(dataset), "resolution": resolution,
                           "channels": channels, "crop": crop, "shard": [shard.index,
                                                                         shard.count],
                           "format": FORMAT_VERSION}, sort_keys=True)
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.-]+", "_", dataset.rstrip("/").split("/")[-1].split(":")[-1])
    shard_text = f"-shard{shard.index}of{shard.count}" if shard.count > 1 else ""
    return f"{name[:40]}-{resolution}x{channels}{shard_text}-{key}"


def _absolute(dataset: str) -> str:
    kind, _, rest = dataset.partition(":")
    if kind == "folder":
        return f"folder:{os.path.abspath(os.path.expanduser(rest))}"
    return dataset


@dataclasses.dataclass
class PreparedImages:
    """An opened prepared folder: `images` is a read-only memory map."""

    path: str
    images: np.ndarray
    meta: dict[str, Any]

    @property
    def unreadable_message(self) -> str | None:
        count = self.meta["unreadable_count"]
        if not count:
            return None
        examples = self.meta["unreadable"]
        return (f"{count} unreadable image file(s) were left out when the data was "
                f"prepared, e.g. {', '.join(examples[:5])}")


def open_prepared(path: str) -> PreparedImages:
    """Opens a complete prepared folder; raises PreparedDataError if it is incomplete."""
    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
        shape = tuple(meta["shape"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PreparedDataError(f"{path} has no readable {META_FILE} ({error})") from None
    images_path = os.path.join(path, IMAGES_FILE)
    expected = int(np.prod(shape))
    size = os.path.getsize(images_path) if os.path.isfile(images_path) else -1
    if size != expected:
        raise PreparedDataError(f"{images_path} holds {max(size, 0):,} bytes, not the "
                                f"{expected:,} of {shape[0]:,} images: it is truncated")
    images = (np.memmap(images_path, np.uint8, mode="r", shape=shape) if expected
              else np.zeros(shape, np.uint8))
    return PreparedImages(path, images, meta)


def _write(path: str, chunks: Any, total: int, image_shape: tuple[int, ...],
           meta: dict[str, Any], progress: Callable[[int], None]) -> None:
    """Writes the folder aside, then renames it into place."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    partial = f"{path}.partial-{_owner()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    written, unreadable = 0, []
    try:
        with open(os.path.join(partial, IMAGES_FILE), "wb") as f:
            for images, bad_paths in chunks:
                f.write(np.ascontiguousarray(images).tobytes())
                written += len(images)
                unreadable.extend(bad_paths)
                progress(len(images) + len(bad_paths))
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


def prepare(path: str, records: Sequence[Any], decode_chunks: Callable[..., Any],
            meta: dict[str, Any], image_shape: tuple[int, ...],
            progress: Callable[[int], None] = lambda n: None) -> PreparedImages:
    """Decodes `records` with `decode_chunks(records)` (yielding (images, unreadable
    paths) pairs) into the prepared folder `path`, and opens it."""
    _write(path, decode_chunks(records), len(records), image_shape, meta, progress)
    return open_prepared(path)


def find_or_prepare(path: str, records: Sequence[Any], fingerprint: str,
                    decode_chunks: Callable[..., Any], meta: dict[str, Any],
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
    """Endless batches of `batch_size` images drawn without replacement from `images`.

    Each epoch is a permutation of every row, seeded by (seed, epoch); its last partial
    batch is dropped. A batch is read as `chunks` runs of sorted rows, so the memory map
    is read in order while every chunk (one D update's real batch) stays a random draw.
    The position (epoch, offset) is all its state; `get_state` and `set_state` carry it as
    JSON bytes, the form grain's orbax handler stores.
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, chunks: int = 1):
        if len(images) < batch_size:
            raise PreparedDataError(f"{len(images)} prepared images are fewer than one "
                                    f"step needs ({batch_size})")
        self.images, self.batch_size, self.seed, self.chunks = images, batch_size, seed, chunks
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
        return {"image": self.images[rows]}

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
