"""Images/s of the input pipeline over folders of JPEGs: decoding every epoch, per worker
count, and batches gathered from prepared data; each unlabelled (the images directly in
the folder) and labelled (the same images in class subfolders, batches with labels).

  python benchmarks/input_pipeline.py --resolutions=64,128 --workers=0,1,2,4 --modes=decode,prepared

Each resolution gets a temporary folder of random 1.5x-sized JPEGs (so every image is
decoded, cropped and resized, as with real photos), and a folder of `--classes` class
subfolders holding the same files (hard links). Compare the figures with the images/s of
benchmarks/train_step.py: the pipeline must deliver more than the step eats. The prepared
mode is timed after its preparation and one pass to warm the page cache; its worker count
only applies to the preparation. The two layouts are timed alternately, `--rounds` times
each, in one process, and the best of each is shown, so a load that comes and goes on the
host weighs on both alike.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from dcgan_jax import cli, data
from dcgan_jax import config as config_lib

from jax_step import cpu_description

flags.DEFINE_list("resolutions", ["64", "128"], "Model resolutions.")
flags.DEFINE_list("workers", ["0", "1", "2", "4"], "Grain worker process counts.")
flags.DEFINE_integer("images", 1024, "JPEG files per folder.")
flags.DEFINE_integer("classes", 10, "Class subfolders of the labelled layout.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("batches", 40, "Timed batches after the first (x 50 when prepared).")
flags.DEFINE_integer("rounds", 2, "Timings of each layout, alternating; the best is shown.")
flags.DEFINE_list("modes", ["decode", "prepared"], "decode and/or prepared.")
FLAGS = flags.FLAGS
LAYOUTS = ("flat", "classes")


def make_folders(root: str, resolution: int, count: int, classes: int) -> dict[str, str]:
    """The JPEGs directly in one folder, and the same files in class subfolders of another."""
    flat = os.path.join(root, str(resolution), "flat")
    labelled = os.path.join(root, str(resolution), "classes")
    os.makedirs(flat)
    rng = np.random.default_rng(0)
    side = resolution * 3 // 2
    for i in range(count):
        pixels = rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)
        name = f"{i:05d}.jpg"
        Image.fromarray(pixels).save(os.path.join(flat, name), quality=90)
        class_folder = os.path.join(labelled, f"c{i % classes:03d}")
        os.makedirs(class_folder, exist_ok=True)
        try:
            os.link(os.path.join(flat, name), os.path.join(class_folder, name))
        except OSError:  # no hard links on this file system
            shutil.copyfile(os.path.join(flat, name), os.path.join(class_folder, name))
    return {"flat": flat, "classes": labelled}


def images_per_second(folder: str, resolution: int, workers: int, mode: str,
                      cache_dir: str, labelled: bool) -> float:
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
    if ("label" in next(iterator)) != labelled:  # Starts the workers.
        raise AssertionError(f"{folder}: batches {'without' if labelled else 'with'} labels")
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * FLAGS.batch_size / (time.perf_counter() - start)
    if hasattr(iterator, "close"):
        iterator.close()
    return rate


def main(argv):
    del argv
    cli.set_up_process()
    cli.quiet_logs()  # no library INFO lines (a missing libtpu, orbax saves)
    print(f"host: {cpu_description()}; {FLAGS.images} JPEGs per folder, flat or in "
          f"{FLAGS.classes} class subfolders, batch {FLAGS.batch_size}, best of "
          f"{FLAGS.rounds} alternating rounds")
    print(f"{'res':>5} {'mode':>9} {'workers':>8} {'flat img/s':>11} {'classes img/s':>14} "
          f"{'classes/flat':>13}")
    print("-" * 65)
    with tempfile.TemporaryDirectory() as root:
        folders = {r: make_folders(root, int(r), FLAGS.images, FLAGS.classes)
                   for r in FLAGS.resolutions}
        for res, mode, workers in itertools.product(FLAGS.resolutions, FLAGS.modes,
                                                    FLAGS.workers):
            best = dict.fromkeys(LAYOUTS, 0.0)
            for _, layout in itertools.product(range(FLAGS.rounds), LAYOUTS):
                cache = os.path.join(root, f"cache_{res}_{mode}_{workers}")
                rate = images_per_second(folders[res][layout], int(res), int(workers), mode,
                                         cache, labelled=layout == "classes")
                best[layout] = max(best[layout], rate)
            print(f"{res:>5} {mode:>9} {workers:>8} {best['flat']:>11.0f} "
                  f"{best['classes']:>14.0f} {best['classes'] / best['flat']:>13.2f}",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
