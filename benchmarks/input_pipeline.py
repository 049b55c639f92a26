"""Images/s of the grain pipeline over folders of JPEGs, per worker count.

  python benchmarks/input_pipeline.py --resolutions=64,128 --workers=0,1,2,4

Each resolution gets a temporary folder of random 1.5x-sized JPEGs (so every image is
decoded, cropped and resized, as with real photos). Compare the figures with the
images/s of benchmarks/train_step.py: the pipeline must deliver more than the step eats.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from dcgan_jax import config as config_lib, data

flags.DEFINE_list("resolutions", ["64", "128"], "Model resolutions.")
flags.DEFINE_list("workers", ["0", "1", "2", "4"], "Grain worker process counts.")
flags.DEFINE_integer("images", 1024, "JPEG files per folder.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("batches", 40, "Timed batches after the first.")
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


def images_per_second(folder: str, resolution: int, workers: int) -> float:
    config = config_lib.get_default_config()
    config.dataset = f"folder:{folder}"
    config.model.resolution = resolution
    config.train.batch_size = FLAGS.batch_size
    config.data.num_workers = workers
    config.data.random_flip = True
    source = data.open_source(config.dataset)
    iterator = data.make_pipeline(config, source, 0, 1)
    next(iterator)  # Starts the workers.
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(iterator)
    return FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    print(f"cpus: {os.cpu_count()}, {FLAGS.images} JPEGs per folder, batch {FLAGS.batch_size}")
    print(f"{'res':>5} {'workers':>8} {'images/s':>10}")
    print("-" * 25)
    with tempfile.TemporaryDirectory() as root:
        folders = {r: make_folder(root, int(r), FLAGS.images) for r in FLAGS.resolutions}
        for res, workers in itertools.product(FLAGS.resolutions, FLAGS.workers):
            rate = images_per_second(folders[res], int(res), int(workers))
            print(f"{res:>5} {workers:>8} {rate:>10.0f}", flush=True)


if __name__ == "__main__":
    app.run(main)
