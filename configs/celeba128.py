"""CelebA faces at 128x128: the square 178x178 centre crop, one more block in G and D."""

from dcgan_jax.config import get_default_config


def get_config():
    config = get_default_config()
    config.dataset = "tfds:celeb_a:train"
    config.data.crop = "center"
    config.data.random_flip = True
    config.model.resolution = 128
    config.train.batch_size = 128
    config.train.num_epochs = 25
    # FID of 10,000 samples against 50,000 training faces every 2,000 steps (about 20 times
    # in a run); the weights are fetched once (or pass --config.eval.fid_weights=PATH).
    config.eval.every = 2000
    return config
