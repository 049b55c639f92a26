"""Fixtures shared by the tests."""

import jax
import pytest

from helpers import COMPILATION_CACHE
from tiny_config import tiny_config

jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)


@pytest.fixture
def config():
    return tiny_config()
