"""unet_jax: U-Nets for 2D and 3D semantic segmentation in JAX and Flax."""

__version__ = '0.1.0'
