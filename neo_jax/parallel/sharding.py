"""Logical axis names -> mesh axes: the one sharding table of NEO.

Every parameter and activation names its dimensions logically (`neo_jax.model.logical_axes`,
`nn.with_logical_constraint` in the model); `RULES` maps each name to mesh axes. Rules are
applied in order and a mesh axis is used at most once per array, so an activation
[batch, length, embed] puts (data, fsdp) on `batch` and leaves `embed` whole, while a parameter
[embed, mlp] puts fsdp on `embed` and tensor on `mlp` (FSDP + tensor parallelism).

A dimension that a mesh axis does not divide (e.g. 2 KV heads on a tensor axis of 4) is
replicated instead; `explain` lists such fallbacks.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from neo_jax.parallel.mesh import BATCH_AXES

# (logical name, mesh axes or None), highest priority first.
RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("heads", "tensor"),  # query heads of q / attention output [B, L, H, D]
    ("kv_heads_act", "tensor"),  # key/value heads of k, v [B, L, Hkv, D]
    ("qk", None),  # query/key width (T + H + W sub-heads)
    ("kv", None),  # value width
    # parameters (and activations sharing a name: `embed`, `mlp`)
    ("vocab", "tensor"),
    ("q_heads", "tensor"),  # flattened heads x head_dim of q_proj, q_proj_hw, o_proj
    ("kv_heads", "tensor"),  # flattened kv heads x head_dim of k_proj, v_proj, k_proj_hw
    ("mlp", "tensor"),
    ("vision", "tensor"),  # width of the 16-px patch features
    ("embed", "fsdp"),
    ("vision_merge", "tensor"),  # 4 * vision width, input of the 2x2 merge
    ("patch", None),  # 3 * 16 * 16 pixel values
    ("norm", None),
    ("layers", None),  # the stacked layer axis of nn.scan
)


def logical_to_spec(logical: P | tuple, rules=RULES) -> P:
  """PartitionSpec of mesh axes for a PartitionSpec (or tuple) of logical names."""
  return nn.logical_to_mesh_axes(tuple(logical), rules)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (replicates those dims)."""
  fitted = []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for name in names:  # keep the longest prefix whose product divides the dimension
      if shape[i] % (math.prod(mesh.shape[n] for n in kept + [name])) == 0:
        kept.append(name)
      else:
        break
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def named_sharding(logical: P | tuple, shape: tuple[int, ...], mesh: Mesh,
                   rules=RULES) -> NamedSharding:
  """NamedSharding of one array from its logical axis names and shape."""
  return NamedSharding(mesh, _fit_spec(logical_to_spec(logical, rules), tuple(shape), mesh))


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules=RULES) -> Any:
  """NamedShardings for a pytree given its logical PartitionSpecs and shaped leaves."""
  is_spec = lambda x: isinstance(x, P)
  return jax.tree.map(lambda spec, x: named_sharding(spec, np.shape(x), mesh, rules),
                      logical_tree, shape_tree, is_leaf=is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def explain(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules=RULES) -> list[str]:
  """One line per parameter: path, shape, logical names, mesh spec (marks fallbacks)."""
  lines = []
  flat_specs = jax.tree_util.tree_flatten_with_path(
      logical_tree, is_leaf=lambda x: isinstance(x, P))[0]
  shapes = jax.tree.leaves(shape_tree)
  for (path, spec), x in zip(flat_specs, shapes):
    wanted = logical_to_spec(spec, rules)
    got = _fit_spec(wanted, np.shape(x), mesh)
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    note = "" if tuple(got) == tuple(wanted) + (None,) * (len(got) - len(wanted)) else \
        f"  (wanted {wanted}: not divisible, replicated)"
    lines.append(f"{name} {tuple(np.shape(x))} {tuple(spec)} -> {got}{note}")
  return lines


# --- the batch ------------------------------------------------------------------------------

def batch_spec(ndim: int) -> P:
  """Leading (batch) dimension over (data, fsdp); the rest whole."""
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  return {k: NamedSharding(mesh, batch_spec(np.ndim(v))) for k, v in batch.items()}


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                shardings: Optional[Mapping[str, NamedSharding]] = None) -> dict[str, jax.Array]:
  """Global jax arrays from this process's slice of the batch (multi-process safe).

  Each process passes its own rows [B_local, ...]; the global batch is their concatenation in
  process order, split over (data, fsdp).
  """
  shardings = shardings or batch_shardings(local_batch, mesh)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    n_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % n_shards:
      raise ValueError(f"batch: global batch {global_rows} (key {key!r}) is not divisible by "
                       f"data*fsdp = {n_shards}; change data.batch_size or the mesh")
    out[key] = jax.make_array_from_process_local_data(shardings[key], value)
  return out
