"""Device mesh, the logical-axis sharding table, batch sharding, process initialisation."""

from neo_jax.parallel.mesh import BATCH_AXES, MESH_AXES, batch_divisor, make_mesh
from neo_jax.parallel.sharding import (
  RULES,
  batch_shardings,
  explain,
  mesh_context,
  named_sharding,
  replicated,
  rules_from_table,
  rules_table,
  shard_batch,
  tree_shardings,
)

__all__ = [
  "BATCH_AXES",
  "MESH_AXES",
  "RULES",
  "batch_divisor",
  "batch_shardings",
  "explain",
  "make_mesh",
  "mesh_context",
  "named_sharding",
  "replicated",
  "rules_from_table",
  "rules_table",
  "shard_batch",
  "tree_shardings",
]
