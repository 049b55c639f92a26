"""celeba64 with Multi-Scale Gradients (MSG-GAN): G and D exchange images at every block."""

from dcgan_jax.config import overlay


def get_config():
    config = overlay("celeba64.py", beside=__file__)
    config.model.msg = True
    config.model.msg_combine = "simple"
    return config
