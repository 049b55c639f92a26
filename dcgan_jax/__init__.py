"""dcgan_jax: DCGAN and MSG-GAN training in JAX/Flax, on one device or a pod."""

__version__ = "0.1.0"
