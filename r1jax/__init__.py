"""r1jax: the DeepSeek-R1 training pipeline, JAX-native."""

__version__ = "0.1.0"
