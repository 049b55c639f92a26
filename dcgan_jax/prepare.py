"""Command line: decode a config's dataset once into the cache, ahead of training.

  python -m dcgan_jax.prepare --config=configs/celeba64.py
  python -m dcgan_jax.prepare --config=configs/celeba64.py --num_processes=8   # for a pod

Training prepares what is missing by itself (`data.prepared='auto'`); this command does it
ahead of time, with a progress bar and every core of the host. For a run of N processes,
each process trains on its own shard: `--num_processes=N` prepares all N shards here (copy
`data.cache_dir` to the hosts, or share it), `--process_id=I` only host I's.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # Before the imports below: Ctrl-C during them is one line too.
    from dcgan_jax import signals
    signals.exit_on_stop_signals("dcgan_jax.prepare")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dcgan_jax import cli  # noqa: E402
from dcgan_jax import config as config_lib  # noqa: E402
from dcgan_jax.errors import UserFacingError  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).",
                                lock_config=True)
flags.DEFINE_integer("num_processes", 1, "Processes of the training run: one shard each.")
flags.DEFINE_integer("process_id", None, "Prepare only this process's shard (default: all).")
flags.DEFINE_integer("workers", None, "Decoding processes (default: one per core).")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.set_up_process()
    from dcgan_jax import data, prepared
    config = FLAGS.config
    try:
        config_lib.validate(config, process_count=FLAGS.num_processes)
        if FLAGS.process_id is not None and not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise config_lib.ConfigError(f"--process_id={FLAGS.process_id} must be in "
                                         f"[0, {FLAGS.num_processes})")
        source = data.open_source(config.dataset, config.data.cache_dir,
                                  config.data.tfds_data_dir, config.data.label_key)
        shards = ([FLAGS.process_id] if FLAGS.process_id is not None
                  else range(FLAGS.num_processes))
        workers = FLAGS.workers if FLAGS.workers is not None else os.cpu_count() or 1
        for index in shards:
            images = data.prepare_shard(config, source,
                                        prepared.Shard(index, FLAGS.num_processes),
                                        say=print, workers=workers, progress=True)
            classes = f", {source.num_classes} classes" if source.num_classes else ""
            print(f"Ready: {images.path} ({len(images.images):,} images{classes})")
            if message := images.unreadable_message:
                print(f"Warning: {message}")
    except (UserFacingError, ValueError, OSError) as error:  # ValueError: a record's decode
        sys.exit(f"dcgan_jax.prepare: error: {str(error).splitlines()[0]}")


if __name__ == "__main__":
    app.run(main)
