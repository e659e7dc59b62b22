"""Which rows of the global batch each process feeds: batch shards, not processes.

The batch dimension is split over the mesh axes (data, fsdp) into S batch shards; shard k holds
rows [k * B/S, (k + 1) * B/S) of an update's B rows. The other axis, tensor, replicates the
batch: all devices of a tensor group hold the same shard. So a process feeds exactly the shards
its devices hold, and when a tensor group spans processes (one process per GPU with tensor
parallelism, or tensor > chips per TPU host) those processes hold the same shards and must
feed the same rows.

Processes holding the same shards form a *data group*; the data pipeline reads one stream per
group (`group` of `groups`), so processes of one group read identical rows and different groups
read disjoint ones. A mesh where two processes hold overlapping but different sets of shards
(or sets of different sizes) cannot be fed this way and is refused, naming the axes that span
processes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh

from neo_jax.errors import UserError
from neo_jax.parallel.mesh import BATCH_AXES, MESH_AXES


def shards_by_process(mesh: Mesh) -> dict[int, tuple[int, ...]]:
  """{process index: the batch shards its devices hold, ascending}."""
  devices = np.asarray(mesh.devices)
  fsdp = mesh.shape[BATCH_AXES[1]]
  held: dict[int, set[int]] = {}
  for (d, f, _), device in np.ndenumerate(devices):
    held.setdefault(device.process_index, set()).add(d * fsdp + f)
  return {p: tuple(sorted(s)) for p, s in sorted(held.items())}


def _axes_spanning_processes(mesh: Mesh) -> list[str]:
  devices = np.asarray(mesh.devices)
  spanning = []
  for axis, name in enumerate(MESH_AXES):
    rows = np.moveaxis(devices, axis, -1).reshape(-1, devices.shape[axis])
    if any(len({dev.process_index for dev in row}) > 1 for row in rows):
      spanning.append(f"{name}={mesh.shape[name]}")
  return spanning


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How one update's `rows` lie over the processes (see the module docstring)."""

  rows: int  # B: rows per update over all processes
  shards: int  # S = data * fsdp
  held: tuple[int, ...]  # the shards this process feeds, ascending
  group: int  # this process's data group (groups are ordered by their first shard)
  groups: int  # number of data groups (= processes when no tensor group spans processes)

  @property
  def rows_per_shard(self) -> int:
    return self.rows // self.shards

  @property
  def local_rows(self) -> int:
    """Rows this process feeds per update (those of its shards, in shard order)."""
    return len(self.held) * self.rows_per_shard

  def row_ids(self) -> np.ndarray:
    """Global row index of each local row."""
    per = self.rows_per_shard
    return np.concatenate([np.arange(k * per, (k + 1) * per) for k in self.held])

  @classmethod
  def by_process(
    cls, rows: int, process_index: int | None = None, process_count: int | None = None
  ) -> BatchLayout:
    """Without a mesh: process i feeds the i-th of `process_count` equal blocks."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if rows % count:
      raise UserError(f"data: {rows} rows per update are not divisible by the {count} processes")
    return cls(rows=rows, shards=count, held=(index,), group=index, groups=count)


def batch_layout(
  mesh: Mesh, rows: int, grad_accum_steps: int = 1, process_index: int | None = None
) -> BatchLayout:
  """The layout of `rows` per update on `mesh`; a one-line UserError when it cannot be fed."""
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  axes = ", ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
  if rows <= 0 or rows % grad_accum_steps:
    raise UserError(
      f"data: {rows} rows per update do not split into grad_accum_steps="
      f"{grad_accum_steps} micro-batches"
    )
  micro = rows // grad_accum_steps
  if micro % shards:
    raise UserError(
      f"data: {micro} rows per micro-batch ({rows} per update / grad_accum_steps"
      f"={grad_accum_steps}) are not divisible by the mesh's {shards} batch "
      f"shards ({axes}); set data.batch_size to a multiple of "
      f"{shards * grad_accum_steps} or data.batch_size=0 with data.rows_per_shard"
    )
  by_process = shards_by_process(mesh)
  index = jax.process_index() if process_index is None else process_index
  if index not in by_process:
    raise UserError(f"mesh: process {index} holds none of the mesh's devices")
  sets = sorted(set(by_process.values()), key=lambda s: s[0])
  for i, a in enumerate(sets):
    for b in sets[i + 1 :]:
      if set(a) & set(b) or len(a) != len(b):
        pa = [p for p, s in by_process.items() if s == a][0]
        pb = [p for p, s in by_process.items() if s == b][0]
        raise UserError(
          f"mesh: processes {pa} and {pb} hold batch shards {list(a)} and {list(b)}, which "
          f"overlap or differ in number, so no data stream can feed them (axes spanning "
          f"processes: {', '.join(_axes_spanning_processes(mesh))}); use a mesh whose tensor "
          f"groups lie within a process or span whole processes"
        )
  held = by_process[index]
  return BatchLayout(rows=rows, shards=shards, held=held, group=sets.index(held), groups=len(sets))
