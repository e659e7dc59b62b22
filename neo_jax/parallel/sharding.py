"""Logical axis names -> mesh axes: the one sharding table of NEO.

Every parameter and activation names its dimensions logically (`neo_jax.model.logical_axes`,
`nn.with_logical_constraint` in the model); `RULES` maps each name to mesh axes. Weights and
activations have names of their own: a weight [embed, mlp] is split fsdp x tensor (FSDP +
tensor parallelism) while an activation [activation_batch, activation_length,
activation_embed] puts (data, fsdp) on the batch and keeps the model dimension whole, whatever
the order of the rules. A training config carries the table as `config.mesh.rules`, one field
per name (`--config.mesh.rules.activation_mlp=` replicates it).

A dimension that a mesh axis does not divide (e.g. 2 KV heads on a tensor axis of 4) is
replicated instead; `explain` lists such fallbacks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from neo_jax.parallel.layout import shards_by_process
from neo_jax.parallel.mesh import BATCH_AXES, MESH_AXES

Rules = tuple[tuple[str, Any], ...]

RULES: Rules = (
  # activations: the arrays the model constrains between its layers
  ("activation_batch", BATCH_AXES),  # rows of the batch; also every input array
  ("activation_length", None),
  ("activation_embed", None),  # the model dimension D stays whole
  ("activation_mlp", "tensor"),  # the MLP's inner F [B, L, F]
  ("activation_heads", "tensor"),  # query heads of q / the attention output [B, L, H, D]
  ("activation_kv_heads", "tensor"),  # key/value heads of k, v [B, L, Hkv, D]
  ("activation_qk", None),  # query/key width (T + H + W sub-heads)
  ("activation_kv", None),  # value width
  # parameters
  ("vocab", "tensor"),  # embedding rows / head columns
  ("embed", "fsdp"),  # the model dimension of every weight
  ("q_heads", "tensor"),  # flattened heads x head_dim of q_proj, q_proj_hw, o_proj
  ("kv_heads", "tensor"),  # flattened kv heads x head_dim of k_proj, v_proj, k_proj_hw
  ("mlp", "tensor"),
  ("vision", "tensor"),  # width of the 16-px patch features
  ("vision_merge", "tensor"),  # 4 * vision width, input of the 2x2 merge
  ("patch", None),  # 3 * 16 * 16 pixel values
  ("norm", None),
  ("layers", None),  # the stacked layer axis of nn.scan
)


def rules_table(rules: Rules = RULES) -> dict[str, tuple[str, ...]]:
  """{logical name: mesh axes} with every entry a tuple (() = whole): a config's form."""
  return {
    name: (() if axes is None else (axes,) if isinstance(axes, str) else tuple(axes))
    for name, axes in rules
  }


def rules_from_table(table: Mapping[str, Sequence[str]]) -> Rules:
  """The rules of a `rules_table` (e.g. config.mesh.rules); unknown mesh axes are an error."""
  rules = []
  for name, axes in table.items():
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"sharding rule {name}: mesh axes {unknown} are not among {MESH_AXES}")
    rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(rules)


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


def named_sharding(
  logical: P | tuple, shape: tuple[int, ...], mesh: Mesh, rules=RULES
) -> NamedSharding:
  """NamedSharding of one array from its logical axis names and shape."""
  return NamedSharding(mesh, _fit_spec(logical_to_spec(logical, rules), tuple(shape), mesh))


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules=RULES) -> Any:
  """NamedShardings for a pytree given its logical PartitionSpecs and shaped leaves."""
  is_spec = lambda x: isinstance(x, P)
  return jax.tree.map(
    lambda spec, x: named_sharding(spec, np.shape(x), mesh, rules),
    logical_tree,
    shape_tree,
    is_leaf=is_spec,
  )


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules = RULES) -> Iterator[None]:
  """The mesh and the logical-axis rules together, as every sharded trace and call needs them:
  jax resolves shardings against the mesh, the model's logical constraints against the rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def explain(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules=RULES) -> list[str]:
  """One line per parameter: path, shape, logical names, mesh spec (marks fallbacks)."""
  lines = []
  flat_specs = jax.tree_util.tree_flatten_with_path(
    logical_tree, is_leaf=lambda x: isinstance(x, P)
  )[0]
  shapes = jax.tree.leaves(shape_tree)
  for (path, spec), x in zip(flat_specs, shapes):
    wanted = logical_to_spec(spec, rules)
    got = _fit_spec(wanted, np.shape(x), mesh)
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    note = (
      ""
      if tuple(got) == tuple(wanted) + (None,) * (len(got) - len(wanted))
      else f"  (wanted {wanted}: not divisible, replicated)"
    )
    lines.append(f"{name} {tuple(np.shape(x))} {tuple(spec)} -> {got}{note}")
  return lines


# --- the batch ------------------------------------------------------------------------------


def batch_spec(ndim: int) -> P:
  """Leading (batch) dimension over (data, fsdp); the rest whole."""
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  return {k: NamedSharding(mesh, batch_spec(np.ndim(v))) for k, v in batch.items()}


def shard_batch(
  local_batch: Mapping[str, np.ndarray],
  mesh: Mesh,
  shardings: Mapping[str, NamedSharding] | None = None,
) -> dict[str, jax.Array]:
  """Global jax arrays from this process's rows of the batch (multi-process safe).

  Each process passes the rows of the batch shards its devices hold, in shard order
  (neo_jax/parallel/layout.py): with one process, the whole batch; with processes holding
  distinct shards, their blocks in order; processes of one tensor group pass the same rows.
  """
  shardings = shardings or batch_shardings(local_batch, mesh)
  held = shards_by_process(mesh)[jax.process_index()]
  n_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.shape[0] % len(held):
      raise ValueError(
        f"batch: {value.shape[0]} local rows (key {key!r}) do not split over "
        f"the {len(held)} batch shards this process holds; change "
        "data.batch_size or the mesh"
      )
    per = value.shape[0] // len(held)
    offset = {k: i * per for i, k in enumerate(held)}

    def rows(index, value=value, per=per, offset=offset):
      start = index[0].start or 0
      at = offset[start // per] + start % per
      stop = at + ((index[0].stop or n_shards * per) - start)
      return value[(slice(at, stop),) + tuple(index[1:])]

    out[key] = jax.make_array_from_callback(
      (n_shards * per,) + value.shape[1:], shardings[key], rows
    )
  return out


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
  """This process's rows of a batch-sharded global array (its shards in order), as numpy:
  the inverse of `shard_batch`."""
  if x.is_fully_addressable:
    return np.asarray(x)
  held = shards_by_process(mesh)[jax.process_index()]
  per = x.shape[0] // math.prod(mesh.shape[a] for a in BATCH_AXES)
  by_start = {(s.index[0].start or 0): s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(by_start[k * per]) for k in held])
