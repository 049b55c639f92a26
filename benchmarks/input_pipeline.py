"""Images/s of the input pipeline over folders of JPEGs: decoding every epoch, per worker
count, and batches gathered from prepared data.

  python benchmarks/input_pipeline.py --resolutions=64,128 --workers=0,1,2,4 --modes=decode,prepared

Each resolution gets a temporary folder of random 1.5x-sized JPEGs (so every image is
decoded, cropped and resized, as with real photos). Compare the figures with the
images/s of benchmarks/train_step.py: the pipeline must deliver more than the step eats.
The prepared mode is timed after its preparation and one pass to warm the page cache; its
worker count only applies to the preparation.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from jax_step import cpu_description
from dcgan_jax import cli, config as config_lib, data

flags.DEFINE_list("resolutions", ["64", "128"], "Model resolutions.")
flags.DEFINE_list("workers", ["0", "1", "2", "4"], "Grain worker process counts.")
flags.DEFINE_integer("images", 1024, "JPEG files per folder.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("batches", 40, "Timed batches after the first (x 50 when prepared).")
flags.DEFINE_list("modes", ["decode", "prepared"], "decode and/or prepared.")
FLAGS = flags.FLAGS


def make_folder(root: str, resolution: int, count: int) -> str:
    folder = os.path.join(root, str(resolution))
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    side = resolution * 3 // 2
    for i in range(count):
        pixels = rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return folder


def images_per_second(folder: str, resolution: int, workers: int, mode: str,
                      cache_dir: str) -> float:
    config = config_lib.get_default_config()
    config.dataset = f"folder:{folder}"
    config.model.resolution = resolution
    config.train.batch_size = FLAGS.batch_size
    config.data.num_workers = workers
    config.data.prepared = "auto" if mode == "prepared" else "off"
    config.data.cache_dir = cache_dir
    source = data.open_source(config.dataset)
    iterator = data.make_pipeline(config, source, 0, 1, say=lambda line: None)
    batches = FLAGS.batches
    if mode == "prepared":
        batches *= 50
        for _ in range(len(source) // FLAGS.batch_size):
            next(iterator)
    next(iterator)  # Starts the workers.
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * FLAGS.batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    cli.quiet_logs()  # no library INFO lines (a missing libtpu, orbax saves)
    print(f"host: {cpu_description()}; {FLAGS.images} JPEGs per folder, batch "
          f"{FLAGS.batch_size}")
    print(f"{'res':>5} {'mode':>9} {'workers':>8} {'images/s':>10}")
    print("-" * 35)
    with tempfile.TemporaryDirectory() as root:
        folders = {r: make_folder(root, int(r), FLAGS.images) for r in FLAGS.resolutions}
        for res, mode, workers in itertools.product(FLAGS.resolutions, FLAGS.modes,
                                                    FLAGS.workers):
            cache = os.path.join(root, f"cache_{res}_{mode}_{workers}")
            rate = images_per_second(folders[res], int(res), int(workers), mode, cache)
            print(f"{res:>5} {mode:>9} {workers:>8} {rate:>10.0f}", flush=True)


if __name__ == "__main__":
    app.run(main)
