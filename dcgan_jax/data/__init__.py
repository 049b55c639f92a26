"""The input pipeline for every image source: shuffled, sharded per host, resumable, with
labels where the source has them.

  sources   the kinds of config.dataset (demo:, tfds:, folder:, kaggle:), in one registry;
  decode    a record to a uint8 image: crop, resize, unreadable files;
  pipeline  batches of a process's shard, prepared once into the cache or decoded by grain
            workers every epoch; evaluation batches and figure images;
  feeding   batches put on the devices, with the data position after each.

A batch is {"image": uint8 [n, H, W, C], "label": int32 [n]}, "label" only from a labelled
source. Importing this package does not import TensorFlow: a tfds source imports it when
it is opened.
"""

from dcgan_jax.data.decode import CropError, Loader, preprocess
from dcgan_jax.data.feeding import DeviceBatches, Position
from dcgan_jax.data.pipeline import (
    UnreadableReport,
    evaluation_batches,
    make_pipeline,
    prepare_shard,
    prepared_folder,
    sample_images,
    shard,
    steps_per_epoch,
)
from dcgan_jax.data.sources import (
    IMAGE_EXTENSIONS,
    SOURCES,
    DataError,
    Source,
    cache_root,
    list_image_files,
    local_cache_root,
    open_source,
)

__all__ = [
    "IMAGE_EXTENSIONS", "SOURCES", "CropError", "DataError", "DeviceBatches", "Loader",
    "Position", "Source", "UnreadableReport", "cache_root", "evaluation_batches",
    "list_image_files", "local_cache_root", "make_pipeline", "open_source", "preprocess",
    "prepare_shard", "prepared_folder", "sample_images", "shard", "steps_per_epoch",
]
