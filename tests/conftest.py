"""Fixtures shared by the tests."""

import jax
import pytest
from absl import flags

from dcgan_jax import cli

from helpers import COMPILATION_CACHE, calibrated_fid_weights
from tiny_config import tiny_config

# The command lines' process settings (JAX's classic threefry), which tests' numbers assume.
cli.set_up_process()
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
# The in-process tests compile many small programs and run each a few times: XLA's
# optimisations cost more than they save. Command lines started by the tests (marked slow)
# compile as users' runs do.
jax.config.update("jax_disable_most_optimizations", True)
# Grain's worker processes read absl flags, which the command line parses in real runs.
flags.FLAGS.mark_as_parsed()


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture(scope="session")
def torch_weights(tmp_path_factory):
    """Random FID Inception weights with calibrated BatchNorm statistics, as PyTorch saves
    them (`helpers.calibrated_fid_weights`): (state dict, {"zip": path, "legacy": path})."""
    pytest.importorskip("torch")
    pytest.importorskip("pytorch_fid")
    return calibrated_fid_weights(str(tmp_path_factory.mktemp("fid_weights")))
