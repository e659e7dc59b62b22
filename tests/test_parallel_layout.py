"""Which rows each process feeds (neo_jax/parallel/layout.py), on meshes described by hand:
a mesh here is only its axis sizes and which process owns each device."""

from __future__ import annotations

import types

import numpy as np
import pytest

from neo_jax.errors import UserError
from neo_jax.parallel.layout import BatchLayout, batch_layout, shards_by_process


def fake_mesh(owners: list) -> types.SimpleNamespace:
  """owners[d][f][t] = process index of that device of a (data, fsdp, tensor) mesh."""
  owners = np.asarray(owners)
  devices = np.empty(owners.shape, object)
  for index, p in np.ndenumerate(owners):
    devices[index] = types.SimpleNamespace(process_index=int(p))
  return types.SimpleNamespace(
    devices=devices, shape=dict(zip(("data", "fsdp", "tensor"), owners.shape))
  )


def test_one_process_feeds_every_shard():
  layout = batch_layout(fake_mesh([[[0, 0], [0, 0]], [[0, 0], [0, 0]]]), 8, process_index=0)
  assert (layout.shards, layout.held, layout.group, layout.groups) == (4, (0, 1, 2, 3), 0, 1)
  assert layout.local_rows == 8 and list(layout.row_ids()) == list(range(8))


def test_processes_split_over_fsdp_feed_their_blocks():
  mesh = fake_mesh([[[0], [0], [1], [1]]])  # fsdp=4 over 2 processes
  a, b = (batch_layout(mesh, 8, process_index=p) for p in (0, 1))
  assert (a.held, b.held, a.groups) == ((0, 1), (2, 3), 2)
  assert list(a.row_ids()) == [0, 1, 2, 3] and list(b.row_ids()) == [4, 5, 6, 7]


def test_a_tensor_group_across_processes_feeds_the_same_rows():
  mesh = fake_mesh([[[0, 1]]])  # 2 processes x 1 device, tensor=2: one batch shard
  a, b = (batch_layout(mesh, 4, process_index=p) for p in (0, 1))
  assert a == b and (a.held, a.group, a.groups, a.local_rows) == ((0,), 0, 1, 4)
  # fsdp x tensor over 2 processes x 2 devices: each process one fsdp shard (both halves)
  mesh = fake_mesh([[[0, 0], [1, 1]]])
  a, b = (batch_layout(mesh, 4, process_index=p) for p in (0, 1))
  assert (a.held, b.held, a.groups, a.local_rows) == ((0,), (1,), 2, 2)
  # ... or each process one tensor half of both fsdp shards: one group, every row
  mesh = fake_mesh([[[0, 1], [0, 1]]])
  a, b = (batch_layout(mesh, 4, process_index=p) for p in (0, 1))
  assert a == b and (a.held, a.groups, a.local_rows) == ((0, 1), 1, 4)
  assert shards_by_process(mesh) == {0: (0, 1), 1: (0, 1)}


def test_meshes_no_stream_can_feed_are_refused_naming_the_axes():
  mesh = fake_mesh([[[0, 0], [0, 1], [1, 1]]])  # process 0: shards {0, 1}, process 1: {1, 2}
  with pytest.raises(
    UserError,
    match=r"processes 0 and 1 hold batch shards \[0, 1\] and "
    r"\[1, 2\].*axes spanning processes: fsdp=3, tensor=2",
  ):
    batch_layout(mesh, 6, process_index=0)


@pytest.mark.parametrize(
  "rows, accum, message",
  [
    (
      6,
      1,
      "6 rows per micro-batch .* not divisible by the mesh's 4 batch shards "
      r"\(data=2, fsdp=2\); set data.batch_size to a multiple of 4",
    ),
    (8, 4, "2 rows per micro-batch .* a multiple of 16"),
    (9, 2, "9 rows per update do not split into grad_accum_steps=2"),
  ],
)
def test_batch_sizes_that_do_not_fit_the_mesh_are_one_line_errors(rows, accum, message):
  mesh = fake_mesh(np.zeros((2, 2, 1), int).tolist())
  with pytest.raises(UserError, match=message):
    batch_layout(mesh, rows, accum, process_index=0)


def test_without_a_mesh_each_process_feeds_its_block():
  layout = BatchLayout.by_process(8, process_index=1, process_count=2)
  assert list(layout.row_ids()) == [4, 5, 6, 7] and layout.group == 1
  with pytest.raises(UserError, match="9 rows per update are not divisible by the 2"):
    BatchLayout.by_process(9, process_index=0, process_count=2)
