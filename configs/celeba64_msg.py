"""celeba64 with Multi-Scale Gradients (MSG-GAN): G and D exchange images at every block."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import celeba64  # noqa: E402


def get_config():
    config = celeba64.get_config()
    config.model.msg = True
    config.model.msg_combine = "simple"
    return config
