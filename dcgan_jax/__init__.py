"""dcgan_jax: DCGAN and MSG-GAN training in JAX/Flax, on one device or a pod."""

__version__ = "0.1.0"

import jax as _jax

# JAX's default partitionable threefry takes seconds per random op to compile on CPUs. The
# classic scheme gives the same numbers on any device count too, and a step draws few.
_jax.config.update("jax_threefry_partitionable", False)
