"""pytorch/examples' DCGAN settings as the fields of a dcgan_jax config that the step reads.

The benchmarks build their config here rather than from `configs/`, so that they run where
only jax, flax, optax and absl are installed (no ml_collections).
"""

from __future__ import annotations

import types

NZ, NGF, NDF, CHANNELS = 100, 64, 64, 3
LR, BETAS = 2e-4, (0.5, 0.999)
SEED = 0


def jax_config(resolution: int, batch_size: int, dtype: str) -> types.SimpleNamespace:
    """The fields of `dcgan_jax.config.get_default_config()` that the train step reads."""
    model = types.SimpleNamespace(resolution=resolution, channels=CHANNELS, nz=NZ, ngf=NGF,
                                  ndf=NDF, msg=False, msg_combine="simple")
    train = types.SimpleNamespace(batch_size=batch_size, lr_d=LR, lr_g=LR, beta1=BETAS[0],
                                  beta2=BETAS[1], lr_decay=False, d_steps=1,
                                  label_smoothing=0.0, ema_decay=0.0)
    return types.SimpleNamespace(seed=SEED, dtype=dtype, model=model, train=train)
