"""Every field at its default: DCGAN at 64x64 (see dcgan_jax/config.py for each field)."""

from dcgan_jax.config import get_default_config


def get_config():
    return get_default_config()
