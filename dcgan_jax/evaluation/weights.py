"""The FID network's weights: pytorch-fid's `pt_inception-2015-12-05` file, found, fetched
or converted, checked, and read without PyTorch.

A `.pth` file is a pickle of tensors, either in a zip archive (PyTorch >= 1.6) or in the
older sequential format. `read_state_dict` reads both with one restricted unpickler that
builds tensor placeholders and refuses every other object, so no code in the file can run,
and it bounds every tensor by its storage and every storage by the file.

Every file is checked against the SHA-256 of pytorch-fid's file: a fetched one always, a
given one unless `allow_unknown` says to accept other weights (whose FID is then not
comparable with published values). A fetched file is converted once to `.npz` in the cache;
that conversion, written only after the check passed, is trusted. Should it become unreadable,
it is moved aside (NAME.npz.bad-TIME) and fetched again.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import http.client
import math
import os
import pickle
import tempfile
import time
import urllib.request
import zipfile
from typing import Any, BinaryIO

import numpy as np

from dcgan_jax import paths
from dcgan_jax.errors import UserFacingError

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d"
# SHA-256 of pytorch-fid's file, as recorded beside WEIGHTS_URL in
# snap-research/discoscene, models/inception_model.py (_MODEL_URL_SHA256["tf_inception_v3"]);
# it starts with the name's suffix, which is what torch.hub checks.
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# Mirrors can stand in for GitHub: DCGAN_JAX_FID_WEIGHTS_URL replaces WEIGHTS_URL. What they
# serve is checked against WEIGHTS_SHA256 all the same.
URL_VARIABLE = "DCGAN_JAX_FID_WEIGHTS_URL"
FLAG_HINT = ("--allow_unknown_weights (in training: config.eval.allow_unknown_weights=True) "
             "to use it anyway")

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class WeightsError(UserFacingError, ValueError):
    """The FID weights cannot be found, fetched, trusted or read."""


def _clip(value: Any, limit: int = 60) -> str:
    """A file-given value in a one-line message: escaped, and short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _refuse_state(self: Any, state: Any) -> None:
    """Pickle's BUILD would otherwise overwrite a checked placeholder's fields."""
    raise pickle.UnpicklingError(f"refusing to set the state of a {type(self).__name__}")


@dataclasses.dataclass
class _Storage:
    dtype: np.dtype
    key: str
    data: np.ndarray | None = None

    __setstate__ = _refuse_state


@dataclasses.dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    __setstate__ = _refuse_state

    def to_numpy(self, name: str) -> np.ndarray:
        """The tensor's elements, refused unless every one lies inside its storage."""
        flat = self.storage.data
        shape, stride = self.shape, self.stride
        if (self.offset < 0 or min(shape, default=0) < 0 or min(stride, default=0) < 0
                or len(shape) != len(stride) or len(shape) > 32):
            raise ValueError(f"tensor {_clip(name)} has offset {self.offset}, shape "
                             f"{_clip(shape)} and stride {_clip(stride)}")
        if 0 in shape:
            return np.zeros(shape, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if last >= len(flat):
            raise ValueError(f"tensor {_clip(name)} (offset {self.offset}, shape {_clip(shape)}"
                             f", stride {_clip(stride)}) reaches outside its storage of "
                             f"{len(flat)} elements")
        # Zero strides could otherwise turn a small storage into a huge copy.
        if math.prod(shape) > len(flat):
            raise ValueError(f"tensor {_clip(name)} of shape {_clip(shape)} has more elements "
                             f"than its storage of {len(flat)}")
        itemsize = flat.dtype.itemsize
        return np.ndarray(shape, flat.dtype, flat, self.offset * itemsize,
                          [s * itemsize for s in stride]).copy()


def _ints(values: Any) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or any(type(v) is not int for v in values):
        raise pickle.UnpicklingError(f"tensor shape or stride {_clip(values)} is not integers")
    return tuple(values)


def _rebuild_tensor(storage: Any, offset: Any, shape: Any, stride: Any, *unused: Any) -> _Tensor:
    del unused  # requires_grad, backward hooks, metadata
    if not isinstance(storage, _Storage) or type(offset) is not int:
        raise pickle.UnpicklingError("a tensor needs a storage and an integer offset")
    return _Tensor(storage, offset, _ints(shape), _ints(stride))


def _rebuild_parameter(tensor: Any, *unused: Any) -> Any:
    del unused  # requires_grad, backward hooks
    return tensor


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    # Storage types stand for their names: nothing the pickle could call or modify.
    **{("torch", name): name for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Builds a state dict with tensor placeholders and refuses any other class. Without
    `storages` it refuses tensors too, as the legacy format's other pickles (a magic number,
    a protocol, system information, storage keys) hold plain ints, strings and dicts."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage] | None = None):
        super().__init__(file, encoding="utf-8")
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name)) if self.storages is not None else None
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {_clip(module)}.{_clip(name)}: "
                                         f"not part of a state dict")
        return found

    def persistent_load(self, saved_id: Any) -> _Storage:
        if (self.storages is None or not isinstance(saved_id, tuple) or len(saved_id) < 3
                or saved_id[0] != "storage" or saved_id[1] not in _STORAGE_DTYPES
                or not isinstance(saved_id[2], (str, int))):
            raise pickle.UnpicklingError(f"unknown persistent id {_clip(saved_id)}")
        dtype, key = np.dtype(_STORAGE_DTYPES[saved_id[1]]), str(saved_id[2])
        storage = self.storages.setdefault(key, _Storage(dtype, key))
        if storage.dtype != dtype:
            raise pickle.UnpicklingError(f"storage {_clip(key)} has two types")
        return storage


def _read_zip(file: BinaryIO, path: str) -> Any:
    with zipfile.ZipFile(file) as archive:
        pickled = next((info for info in archive.infolist() if info.filename == "data.pkl"
                        or info.filename.endswith("/data.pkl")), None)
        if pickled is None:
            raise WeightsError(f"{path} is a zip file but not a PyTorch checkpoint")
        prefix = pickled.filename[:-len("data.pkl")]

        def record(name: str) -> zipfile.ZipInfo:
            # PyTorch stores records uncompressed: their sizes are bounded by the file's.
            info = archive.getinfo(prefix + name)
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"record {_clip(info.filename)} is compressed, which PyTorch "
                                 f"never does")
            return info

        storages: dict[str, _Storage] = {}
        with archive.open(record("data.pkl")) as f:
            result = _Unpickler(f, storages).load()
        for storage in storages.values():
            storage.data = np.frombuffer(archive.read(record(f"data/{storage.key}")),
                                         dtype=storage.dtype)
    return result


def _read_legacy(f: BinaryIO, path: str) -> Any:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    if _Unpickler(f).load() != _LEGACY_MAGIC:
        raise WeightsError(f"{path} is not a PyTorch checkpoint (bad magic number)")
    if _Unpickler(f).load() != _LEGACY_PROTOCOL:
        raise ValueError("unknown legacy protocol version")
    system = _Unpickler(f).load()
    if not isinstance(system, dict) or system.get("little_endian") is not True:
        raise ValueError("not written on a little-endian machine")
    storages: dict[str, _Storage] = {}
    result = _Unpickler(f, storages).load()
    keys = _Unpickler(f).load()
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise ValueError("its storage list does not match its tensors")
    for key in keys:
        storage = storages[str(key)]
        count = int.from_bytes(f.read(8), "little")
        length = count * storage.dtype.itemsize
        if length > size - f.tell():
            raise ValueError(f"storage {_clip(key)} of {count} elements is larger than "
                             f"the rest of the file")
        storage.data = np.frombuffer(f.read(length), dtype=storage.dtype)
    return result


def _is_zip(f: BinaryIO) -> bool:
    """As PyTorch tells its formats apart: by the first bytes, not by a zip directory that a
    legacy file's data could contain."""
    head = f.read(4)
    f.seek(0)
    return head == b"PK\x03\x04"


def read_state_dict(path: str, advice: str = f"fetch it again from {WEIGHTS_URL}"
                    ) -> dict[str, np.ndarray]:
    """A PyTorch state dict (.pth) or its .npz conversion as name -> numpy array; `advice`
    ends the error of a file that cannot be read."""
    if not paths.is_file(path):
        raise WeightsError(f"FID weights file {path} does not exist")
    try:
        with paths.open_file(path) as file:
            if path.endswith(".npz"):
                with np.load(file) as f:
                    return {k: f[k] for k in f.files}
            result = _read_zip(file, path) if _is_zip(file) else _read_legacy(file, path)
        if not isinstance(result, dict):
            raise WeightsError(f"FID weights file {path} holds a {type(result).__name__}, "
                               f"not a state dict")
        return {k: v.to_numpy(k) for k, v in result.items()
                if isinstance(k, str) and isinstance(v, _Tensor)}
    except WeightsError:
        raise
    except Exception as error:  # truncated or crafted files raise many types
        reason = (str(error).splitlines() or [""])[0]
        raise WeightsError(f"FID weights file {path} cannot be read ({type(error).__name__}: "
                           f"{reason}); {advice}") from None


def save_npz(state_dict: dict[str, np.ndarray], path: str) -> None:
    """Writes atomically (on a disk or in a bucket): a crash never leaves a partial file
    under `path`."""
    with paths.atomic_write(path) as f:
        np.savez(f, **state_dict)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    del size, mtime_ns, inode  # the cache key: a changed file is hashed again
    return paths.sha256(path)


def file_digest(path: str) -> str:
    """SHA-256 of a weights file: checked, then part of the key of statistics computed with
    it; remembered, so the check and the key hash the file once."""
    name = path if paths.is_remote(path) else os.path.realpath(path)
    return _digest(name, *paths.signature(path))


def check(path: str, allow_unknown: bool = False) -> None:
    """Refuses a missing file, and one that is not pytorch-fid's unless `allow_unknown`:
    other weights give FIDs that cannot be compared with published ones."""
    if not paths.is_file(path):
        raise WeightsError(f"FID weights file {path} (--fid_weights / "
                           f"config.eval.fid_weights) does not exist")
    digest = file_digest(path)
    if digest != WEIGHTS_SHA256 and not allow_unknown:
        raise WeightsError(f"FID weights file {path} has SHA-256 {digest[:16]}..., not that "
                           f"of pytorch-fid's {WEIGHTS_NAME}.pth ({WEIGHTS_SHA256[:16]}...); "
                           f"its FID would not compare with published ones: pass {FLAG_HINT}")


def _make_folder(folder: str) -> str | None:
    """Creates `folder`; the outermost folder this created, or None if it existed."""
    created, probe = None, os.path.abspath(folder)
    while not os.path.isdir(probe):
        created, probe = probe, os.path.dirname(probe)
    os.makedirs(folder, exist_ok=True)
    return created


def _remove_folder(folder: str, created: str | None) -> None:
    """Removes the folders `_make_folder` created, innermost first, while they are empty."""
    probe = os.path.abspath(folder)
    while created is not None:
        try:
            os.rmdir(probe)
        except OSError:
            return
        if probe == created:
            return
        probe = os.path.dirname(probe)


def _fetch(url: str, cache_dir: str, converted: str) -> None:
    """Downloads, checks and converts the weights into `converted`. A failure leaves neither
    a file nor a folder behind; the folder is made only once there is something to write.
    For a cache in a bucket, the download goes to a local temporary file."""
    local = not paths.is_remote(cache_dir)
    unreachable = (f"the FID weights are not in {cache_dir} and cannot be fetched from {url}"
                   " ({}); download that file on a machine with network and pass "
                   "--fid_weights=PATH (in training: config.eval.fid_weights, or "
                   "config.eval.every=0 to train without FID)")
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (OSError, ValueError) as error:  # ValueError: not a URL
        raise WeightsError(unreachable.format(getattr(error, "reason", error))) from None
    created, download, done = None, None, False
    try:
        with response:
            created = _make_folder(cache_dir) if local else None
            fd, download = tempfile.mkstemp(dir=cache_dir if local else None,
                                            prefix=WEIGHTS_NAME, suffix=".part")
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                while True:
                    try:
                        chunk = response.read(1 << 20)
                    except (OSError, http.client.HTTPException) as error:
                        raise WeightsError(unreachable.format(error)) from None
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != WEIGHTS_SHA256:
            raise WeightsError(f"{url} gave a file whose SHA-256 is {digest.hexdigest()[:16]}"
                               f"..., not that of pytorch-fid's {WEIGHTS_NAME}.pth "
                               f"({WEIGHTS_SHA256[:16]}...); nothing was kept: point "
                               f"{URL_VARIABLE} at a copy of {WEIGHTS_URL}")
        save_npz(read_state_dict(download), converted)
        done = True
    except OSError as error:
        raise WeightsError(f"cannot write the FID weights into {cache_dir} "
                           f"({error.strerror or error}); choose a writable cache folder "
                           f"(--cache_dir, config.data.cache_dir) or pass "
                           f"--fid_weights=PATH") from None
    finally:
        if download is not None and os.path.exists(download):
            os.unlink(download)
        if not done:
            _remove_folder(cache_dir, created)


def locate(path: str, cache_dir: str, allow_unknown: bool = False) -> str:
    """The weights file to read, checked: `path` when given (another than pytorch-fid's only
    with `allow_unknown`); else the conversion in `cache_dir`, fetched, checked and converted
    on first use whatever `allow_unknown` says, so that the cache holds pytorch-fid's only.
    A conversion that cannot be read is moved aside, not left to fail every run, and
    fetched again."""
    if path:
        check(path, allow_unknown)
        return path
    converted = os.path.join(cache_dir, WEIGHTS_NAME + ".npz")
    if paths.is_file(converted):
        aside = f"{converted}.bad-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            read_state_dict(converted, advice=f"moved it to {aside}")
            return converted
        except WeightsError as error:
            try:
                paths.move(converted, aside)
            except OSError as move_error:
                raise WeightsError(f"FID weights file {converted} cannot be read, nor moved "
                                   f"aside ({move_error.strerror or move_error}); remove it, "
                                   f"and it will be fetched again") from None
            print(error, flush=True)
    url = os.environ.get(URL_VARIABLE) or WEIGHTS_URL
    print(f"Fetching the FID weights from {url} into {cache_dir}", flush=True)
    _fetch(url, cache_dir, converted)
    return converted
