"""The FID network's weights: pytorch-fid's `pt_inception-2015-12-05` file, found, fetched
or converted, and read without PyTorch.

A `.pth` file is a pickle of tensors, either in a zip archive (PyTorch >= 1.6) or in the
older sequential format. `read_state_dict` reads both with a restricted unpickler that builds
numpy arrays and refuses every other object, so no code in the file can run. A fetched file
is converted once to `.npz` beside it in the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tempfile
import urllib.request
import zipfile
from typing import Any, BinaryIO

import numpy as np

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d"
# The name's suffix is the start of the file's SHA-256, as torch.hub checks it.
WEIGHTS_SHA256_PREFIX = "6726825d"
# Mirrors can stand in for GitHub: DCGAN_JAX_FID_WEIGHTS_URL replaces WEIGHTS_URL.
URL_VARIABLE = "DCGAN_JAX_FID_WEIGHTS_URL"

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class WeightsError(ValueError):
    """The FID weights cannot be found, fetched or read."""


@dataclasses.dataclass
class _Storage:
    dtype: Any
    key: str
    data: np.ndarray | None = None


@dataclasses.dataclass
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.data
        itemsize = flat.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            flat[self.offset:], self.shape, [s * itemsize for s in self.stride]).copy()


def _rebuild_tensor(storage, offset, shape, stride, *unused):
    del unused  # requires_grad, backward hooks, metadata
    return _Tensor(storage, offset, tuple(shape), tuple(stride))


class _Unpickler(pickle.Unpickler):
    """Builds tensor placeholders; any class but those of a plain state dict is refused."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
        super().__init__(file, encoding="utf-8")
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            import collections
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda tensor, requires_grad, hooks: tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a tensor")

    def persistent_load(self, saved_id: Any) -> _Storage:
        kind, dtype, key, *unused = saved_id
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        return self.storages.setdefault(str(key), _Storage(dtype, str(key)))


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickled = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pickled is None:
            raise WeightsError(f"{path} is a zip file but not a PyTorch checkpoint")
        prefix = pickled[:-len("data.pkl")]
        storages: dict[str, _Storage] = {}
        with archive.open(pickled) as f:
            result = _Unpickler(f, storages).load()
        for storage in storages.values():
            raw = archive.read(f"{prefix}data/{storage.key}")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    return result


def _read_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:
            raise WeightsError(f"{path} is not a PyTorch checkpoint (bad magic number)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info
        storages: dict[str, _Storage] = {}
        result = _Unpickler(f, storages).load()
        for key in pickle.load(f):
            storage = storages[str(key)]
            count = int.from_bytes(f.read(8), "little")
            raw = f.read(count * np.dtype(storage.dtype).itemsize)
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    return result


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict (.pth) or its .npz conversion as name -> numpy array."""
    if not os.path.isfile(path):
        raise WeightsError(f"FID weights file {path} does not exist")
    try:
        if path.endswith(".npz"):
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        result = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except WeightsError:
        raise
    except Exception as error:  # truncated files raise many types
        reason = (str(error).splitlines() or [""])[0]
        raise WeightsError(f"FID weights file {path} cannot be read ({type(error).__name__}: "
                           f"{reason}); fetch it again from {WEIGHTS_URL}") from None
    if not isinstance(result, dict):
        raise WeightsError(f"FID weights file {path} holds a {type(result).__name__}, not a "
                           f"state dict")
    return {k: v.to_numpy() for k, v in result.items() if isinstance(v, _Tensor)}


def save_npz(state_dict: dict[str, np.ndarray], path: str) -> None:
    """Writes atomically: a crash never leaves a partial file under `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz", delete=False) as f:
        np.savez(f, **state_dict)
    os.replace(f.name, path)


def _download(url: str, path: str) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as out:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            os.unlink(out.name)
            raise
    if url == WEIGHTS_URL and not digest.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
        os.unlink(out.name)
        raise WeightsError(f"{url} gave a file whose SHA-256 does not start with "
                           f"{WEIGHTS_SHA256_PREFIX}; try again")
    os.replace(out.name, path)


def locate(path: str, cache_dir: str) -> str:
    """The weights file to read: `path` when given; else the conversion in `cache_dir`,
    fetched and converted on first use."""
    if path:
        if not os.path.isfile(path):
            raise WeightsError(f"FID weights file {path} (--fid_weights / "
                               f"config.eval.fid_weights) does not exist")
        return path
    converted = os.path.join(cache_dir, WEIGHTS_NAME + ".npz")
    if os.path.isfile(converted):
        return converted
    url = os.environ.get(URL_VARIABLE, WEIGHTS_URL)
    downloaded = os.path.join(cache_dir, WEIGHTS_NAME + ".pth")
    if not os.path.isfile(downloaded):
        print(f"Fetching the FID weights from {url} into {cache_dir}", flush=True)
        try:
            _download(url, downloaded)
        except OSError as error:
            raise WeightsError(
                f"the FID weights are not in {cache_dir} and cannot be fetched from {url} "
                f"({getattr(error, 'reason', error)}); download that file on a machine with "
                f"network and pass --fid_weights=PATH (in training: config.eval.fid_weights, "
                f"or config.eval.every=0 to train without FID)") from None
    try:
        save_npz(read_state_dict(downloaded), converted)
    finally:
        os.unlink(downloaded)  # fetched again next time if it could not be read
    return converted


def file_digest(path: str) -> str:
    """SHA-256 of a weights file: part of the key of statistics computed with it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
