"""NEO as pure Flax linen modules, plus helpers that build and inspect its parameters."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from neo_jax.config import NeoConfig
from neo_jax.model.neo import KVCache, NeoModel, gather_embedding, head_weight, init_cache

__all__ = [
  "NeoModel",
  "KVCache",
  "gather_embedding",
  "head_weight",
  "init_cache",
  "init_params",
  "abstract_params",
  "logical_axes",
  "dummy_inputs",
  "param_count",
]


def dummy_inputs(config: NeoConfig, batch: int = 1, length: int = 8, n_visual: int = 1) -> dict:
  """Smallest inputs that touch every parameter (used to trace shapes)."""
  sub = config.merge_size**2
  return dict(
    input_ids=jnp.zeros((batch, length), jnp.int32),
    positions=jnp.zeros((batch, 3, length), jnp.int32),
    segment_ids=jnp.ones((batch, length), jnp.int32),
    pixels=jnp.zeros((batch, n_visual, sub, config.patch_dim), jnp.uint8),
    pixel_rc=jnp.zeros((batch, n_visual, 2), jnp.int32),
  )


def _boxed_init(config: NeoConfig, rng: jax.Array) -> Any:
  return NeoModel(config).init(rng, **dummy_inputs(config))["params"]


@functools.lru_cache(maxsize=16)
def _traced_init(config: NeoConfig) -> tuple[Any, Any]:
  """The one trace of the model's init per config (NeoConfig is frozen): its jaxpr and its
  boxed output shapes. Parameter shapes, dtypes and logical axes come from the shapes, random
  parameters from replaying the jaxpr, so a trainer's set-up never traces the modules again."""
  return jax.make_jaxpr(lambda key: _boxed_init(config, key), return_shape=True)(jax.random.key(0))


def init_params(config: NeoConfig, rng: jax.Array) -> dict:
  """Randomly initialised parameters as a plain pytree of arrays."""
  jaxpr, boxed = _traced_init(config)
  key = jaxpr.in_avals[0]
  if (jnp.shape(rng), rng.dtype) != (key.shape, key.dtype):  # another kind of key (a raw
    return nn.meta.unbox(_boxed_init(config, rng))  # uint32 one): trace for it
  leaves = jax.core.eval_jaxpr(jaxpr.jaxpr, jaxpr.consts, rng)
  return nn.meta.unbox(jax.tree.unflatten(jax.tree.structure(boxed), leaves))


def abstract_params(config: NeoConfig) -> dict:
  """ShapeDtypeStructs of the parameters, without allocating them."""
  return nn.meta.unbox(_traced_init(config)[1])


def logical_axes(config: NeoConfig) -> dict:
  """A PartitionSpec of logical axis names for every parameter (see neo_jax.parallel)."""
  return nn.get_partition_spec(_traced_init(config)[1])


def param_count(tree: Any) -> int:
  return sum(int(x.size) if hasattr(x, "size") else 0 for x in jax.tree.leaves(tree))
