"""`python -m neo_jax.cli ...` is `neo-jax ...`."""

from neo_jax.cli import entry

entry()
