"""A tiny config, used by the tests directly and as `--config=tests/tiny_config.py`."""

import os
import tempfile

from dcgan_jax.config import get_default_config

# Prepared data of the tests, apart from the user's cache.
TEST_CACHE = os.path.join(tempfile.gettempdir(), "dcgan_jax_test_cache")


def tiny_config(**overrides):
    """32x32 grayscale digits with narrow networks: compiles and runs in seconds on a CPU.

    Overrides name nested fields with double underscores: `train__batch_size=8`.
    """
    config = get_default_config()
    config.dataset = "demo:mnist"
    config.model.resolution = 32
    config.model.channels = 1
    config.model.ngf = 8
    config.model.ndf = 8
    config.model.nz = 16
    config.train.batch_size = 16
    config.data.num_workers = 0
    config.data.cache_dir = TEST_CACHE
    config.sample_grid = "4"
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def get_config():
    config = tiny_config()
    config.train.num_steps = 6
    config.log_every = 2
    config.sample_every = 3
    config.ckpt_every = 3
    return config
