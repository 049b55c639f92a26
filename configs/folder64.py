"""Any folder of images at 64x64: pass --config.dataset=folder:/path/to/images."""

from dcgan_jax.config import get_default_config


def get_config():
    config = get_default_config()
    config.dataset = "folder:data/images"
    config.data.crop = "center"
    config.data.random_flip = True
    config.train.batch_size = 64
    config.train.num_epochs = 50
    return config
