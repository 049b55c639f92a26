"""dcgan_jax: DCGAN and MSG-GAN training in JAX/Flax, on one device or a pod."""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# TensorFlow only reads datasets and writes summaries here: its notices at start-up are noise.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# JAX's default partitionable threefry takes seconds per random op to compile on CPUs. The
# classic scheme gives the same numbers on any device count too, and a step draws few.
# JAX reads the variable when it is imported, so that importing dcgan_jax (its config
# schema, say) does not import JAX; where JAX came first, its config is set instead.
_os.environ["JAX_THREEFRY_PARTITIONABLE"] = "false"
if "jax" in _sys.modules:
    _sys.modules["jax"].config.update("jax_threefry_partitionable", False)
