"""A few hundred images in a folder: pass --config.dataset=folder:/path/to/images.

The recipe that scored best at equal steps in benchmarks/small_data.py (500 of the demo
digits, 32x32, judged by the Frechet distance in a digit classifier's features; see
benchmarks/RESULTS.md, "Small data"): DCGAN's own objective ('ns') with a BatchNorm D and
no augmentation, a small batch (more steps per image) and the averaged generator. Hinge
loss with a spectrally normalised D and DiffAugment scored worse at every length tried
(up to 2,500 steps); DiffAugment alone ('color,translation,cutout', the better policy on
digits) trailed by less and less as runs grew (FD 61 against 47 at 1,500 steps, 31 against
26 at 4,000). Add --config.train.augment=color,translation,cutout for much longer runs, or
when D(x) climbs towards 1 while the samples stop improving.
"""

from dcgan_jax.config import get_default_config


def get_config():
    config = get_default_config()
    config.dataset = "folder:data/images"
    config.data.crop = "center"
    config.train.batch_size = 32
    # In steps, not epochs: 4,000 steps are 267 epochs of 480 images at batch 32.
    config.train.num_steps = 4000
    config.train.ema_decay = 0.999
    config.sample_every = 500
    config.ckpt_every = 500
    return config
