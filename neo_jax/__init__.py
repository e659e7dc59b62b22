"""neo-jax: NEO, the native vision-language model, and ACPO preference training in JAX."""

__version__ = "0.1.0"
