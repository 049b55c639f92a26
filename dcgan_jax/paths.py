"""Files on a local disk or in a bucket (`gs://BUCKET/...`), through etils.epath.

A TPU pod's workers share no file system, so a run's workdir and caches may be a bucket.
Every file a run reads or writes goes through here. Local paths behave as plain files do,
and a write is a temporary file renamed into place, so a crash never leaves half a file;
in a bucket a single object write is atomic already, and folders need not be made.

epath reaches buckets through tf.io.gfile when TensorFlow is installed, else (or with
EPATH_USE_TF=false) through fsspec/gcsfs, which honours STORAGE_EMULATOR_HOST. Only the
standard library and etils.epath are imported here, so command lines can check paths
before loading anything heavy.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from typing import IO, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL such as gs://bucket/run rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
    """A local path made absolute, `~` expanded; a URL as given, without a trailing /."""
    text = os.fspath(path)
    return text.rstrip("/") if is_remote(text) else os.path.abspath(os.path.expanduser(text))


def exists(path: PathLike) -> bool:
    return epath.Path(path).exists()


def is_file(path: PathLike) -> bool:
    return epath.Path(path).is_file()


def signature(path: PathLike) -> tuple[int, int, int]:
    """Size, modification time and inode: they change when the file does. An object has
    no inode (0), and its time is in seconds."""
    if is_remote(path):
        stat = epath.Path(path).stat()
        return stat.length, stat.mtime, 0
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def make_dirs(folder: PathLike) -> None:
    """Creates a local folder and its parents; a bucket needs none (objects name their
    folders)."""
    if not is_remote(folder):
        os.makedirs(folder, exist_ok=True)


@contextlib.contextmanager
def open_file(path: PathLike) -> Iterator[IO[bytes]]:
    """A binary file to read. An object is fetched whole, in one request, and read from
    memory: zipfile and numpy seek back and forth, and each seek would be a request."""
    if is_remote(path):
        yield io.BytesIO(read_bytes(path))
    else:
        with open(path, "rb") as f:
            yield f


def sha256(path: PathLike) -> str:
    """The SHA-256 of a file, read in 4 MB chunks (on a disk or in a bucket)."""
    digest = hashlib.sha256()
    with open_file(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_text(path: PathLike) -> str:
    return epath.Path(path).read_text()


def read_bytes(path: PathLike) -> bytes:
    return epath.Path(path).read_bytes()


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[IO[bytes]]:
    """A binary file that appears at `path` whole when the block ends without error, and
    not at all otherwise; its folder is made if local."""
    path = os.fspath(path)
    if is_remote(path):
        buffer = io.BytesIO()
        yield buffer
        with epath.Path(path).open("wb") as f:  # one upload: the object appears whole
            f.write(buffer.getvalue())
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{os.path.basename(path)}.",
                                      suffix=".tmp", delete=False)
    try:
        with tmp:
            yield tmp
        os.chmod(tmp.name, 0o644)  # NamedTemporaryFile makes files only their owner reads
        os.replace(tmp.name, path)
    finally:
        if os.path.exists(tmp.name):
            os.remove(tmp.name)


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def list_names(folder: PathLike) -> list[str]:
    """The names of the files and folders directly in `folder`, sorted."""
    return sorted(p.name for p in epath.Path(folder).iterdir())


def glob(folder: PathLike, pattern: str) -> list[str]:
    """The paths in `folder` that match `pattern`, sorted."""
    return sorted(os.fspath(p) for p in epath.Path(folder).glob(pattern))


def move(source: PathLike, target: PathLike) -> None:
    """Moves a file or folder. In a bucket, which has no renames, a folder's objects are
    copied one by one, then deleted."""
    source, target = os.fspath(source), os.fspath(target)
    if not is_remote(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
        return
    root = epath.Path(source)
    if root.is_file():
        write_bytes(target, root.read_bytes())
        root.unlink()
        return
    for folder, _, names in root.walk():
        # fsspec's walk drops the gs:// of the folders it yields.
        inside = os.path.relpath(_without_scheme(os.fspath(folder)), _without_scheme(source))
        for name in names:
            relative = name if inside == "." else f"{inside}/{name}"
            write_bytes(f"{target}/{relative}", read_bytes(f"{source}/{relative}"))
    root.rmtree()


def _without_scheme(path: str) -> str:
    return path.split("://", 1)[-1]


class Mirror:
    """A local folder whose files `sync` copies into a bucket folder.

    For writers that can only append to local files: TensorBoard's (tf.io.gfile cannot be
    pointed at every GCS endpoint) and metrics.jsonl (objects cannot be appended to). A
    file is uploaded whole whenever it changed, as tf.io.gfile itself does on every flush.
    """

    def __init__(self, remote: str, fetch: tuple[str, ...] = ()):
        """`fetch` names files of the bucket folder to continue: copied down first."""
        self.remote = remote
        self._folder = tempfile.TemporaryDirectory(prefix="dcgan_jax_mirror_")
        self.local = self._folder.name
        self._uploaded: dict[str, tuple[int, int]] = {}
        for name in fetch:
            if exists(source := os.path.join(remote, name)):
                with open(os.path.join(self.local, name), "wb") as out:
                    out.write(read_bytes(source))
                self._uploaded[name] = self._signature(name)

    def _signature(self, name: str) -> tuple[int, int]:
        stat = os.stat(os.path.join(self.local, name))
        return stat.st_size, stat.st_mtime_ns

    def sync(self) -> None:
        """Uploads the files changed since their last upload."""
        for name in sorted(os.listdir(self.local)):
            if os.path.isfile(os.path.join(self.local, name)):
                current = self._signature(name)
                if self._uploaded.get(name) != current:
                    with open(os.path.join(self.local, name), "rb") as f:
                        write_bytes(os.path.join(self.remote, name), f.read())
                    self._uploaded[name] = current
