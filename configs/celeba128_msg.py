"""celeba128 with Multi-Scale Gradients (MSG-GAN): G and D exchange images at every block."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import celeba128  # noqa: E402


def get_config():
    config = celeba128.get_config()
    config.model.msg = True
    config.model.msg_combine = "simple"
    return config
