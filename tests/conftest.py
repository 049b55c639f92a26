"""Fixtures shared by the tests."""

import pytest

from tiny_config import tiny_config


@pytest.fixture
def config():
    return tiny_config()
