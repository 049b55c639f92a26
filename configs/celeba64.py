"""CelebA faces at 64x64: the 108x108 centre face crop, as in DCGAN's CelebA experiments."""

from dcgan_jax.config import get_default_config


def get_config():
    config = get_default_config()
    config.dataset = "tfds:celeb_a:train"
    config.data.crop = "55,35,108,108"  # top, left, height, width of the 178x218 images
    config.data.random_flip = True
    config.train.batch_size = 128
    config.train.num_epochs = 25
    # FID of 10,000 samples against 50,000 training faces every 2,000 steps (about 20 times
    # in a run); the weights are fetched once (or pass --config.eval.fid_weights=PATH).
    config.eval.every = 2000
    return config
