"""dcgan_jax's train step as the benchmarks run it, with pytorch/examples' DCGAN settings.

The config holds only the fields the step reads, rather than coming from `configs/`, so the
benchmarks run where only jax, flax, optax and absl are installed (no ml_collections).
"""

from __future__ import annotations

import time
import types
from typing import Any

import jax
import numpy as np

from dcgan_jax import host_cpu, parallel
from dcgan_jax import step as step_lib

NZ, NGF, NDF, CHANNELS = 100, 64, 64, 3
LR, BETAS = 2e-4, (0.5, 0.999)
SEED = 0


def cpu_description() -> str:
    """This host's processor, model and vector flags, as RESULTS.md rows name it."""
    return host_cpu.description()


def jax_config(resolution: int, batch_size: int, dtype: str, num_classes: int = 0,
               msg: bool = False, g_cond: str = "concat",
               d_cond: str = "concat") -> types.SimpleNamespace:
    """The fields of `dcgan_jax.config.get_default_config()` that the train step reads; with
    `num_classes`, a conditional DCGAN (by default the defaults' concat G and concat D)."""
    model = types.SimpleNamespace(family="dcgan", resolution=resolution, channels=CHANNELS,
                                  nz=NZ, ngf=NGF, ndf=NDF, msg=msg, msg_combine="simple",
                                  leaky_slope=0.2, d_norm="batch", num_classes=num_classes,
                                  g_cond=g_cond, d_cond=d_cond)
    train = types.SimpleNamespace(batch_size=batch_size, lr_d=LR, lr_g=LR, beta1=BETAS[0],
                                  beta2=BETAS[1], lr_decay=False, d_steps=1, loss="ns",
                                  label_smoothing=0.0, gradient_penalty="none", gp_weight=10.0,
                                  augment="", ema_decay=0.0)
    data = types.SimpleNamespace(random_flip=False)
    return types.SimpleNamespace(seed=SEED, dtype=dtype, model=model, train=train, data=data)


def compiled_step(config: types.SimpleNamespace) -> tuple[Any, step_lib.GANState,
                                                          step_lib.Batch, float]:
    """The step compiled ahead of time on all devices, a fresh state, a batch of random uint8
    images (and labels, for a conditional model) already on the devices, and the compile
    time in seconds."""
    r, b = config.model.resolution, config.train.batch_size
    mesh = parallel.make_mesh()
    state = step_lib.create_train_state(config, mesh, total_steps=1)
    rng = np.random.default_rng(SEED)
    local = {"image": rng.integers(0, 256, (1, b // jax.process_count(), r, r, CHANNELS),
                                   dtype=np.uint8)}
    if config.model.num_classes:
        local["label"] = rng.integers(0, config.model.num_classes,
                                      (1, b // jax.process_count()), dtype=np.int32)
    batch = parallel.global_batch(local, mesh, batch_axis=1)
    start = time.perf_counter()
    compiled = step_lib.make_train_step(config, mesh).lower(state, batch).compile()
    return compiled, state, batch, time.perf_counter() - start


def run_steps(compiled: Any, state: step_lib.GANState, batch: step_lib.Batch,
              steps: int) -> step_lib.GANState:
    """`steps` steps on the same batch; the host waits for the devices only at the end."""
    for _ in range(steps):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    return state
