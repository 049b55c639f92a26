"""dcgan_jax: DCGAN and MSG-GAN training in JAX/Flax, on one device or a pod.

Importing the library changes nothing process-wide (JAX's settings, the environment): the
command lines make their settings in `dcgan_jax.cli.set_up_process`.
"""

__version__ = "0.1.0"
