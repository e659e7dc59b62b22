"""The device mesh: three named axes, sized from the config.

    data    pure data parallelism: parameters replicated, batch split
    fsdp    data parallelism with parameters and optimizer state split (ZeRO-3 style)
    tensor  tensor parallelism: heads, MLP width and vocabulary split

All axes are `AxisType.Auto`, so XLA's sharding propagation (GSPMD) fills in what the logical
constraints leave open. The mesh is activated with `jax.set_mesh` (never `with mesh:`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over


def resolve_mesh_shape(
  data: int, fsdp: int, tensor: int, num_devices: int | None = None
) -> tuple[int, int, int]:
  """Fills in one -1 entry so the product equals the device count; checks the rest."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  shape = [int(data), int(fsdp), int(tensor)]
  free = [i for i, n in enumerate(shape) if n == -1]
  if len(free) > 1:
    raise ValueError(
      f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
    )
  if any(n == 0 or n < -1 for n in shape):
    raise ValueError(
      f"mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}"
    )
  fixed = math.prod(n for n in shape if n != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"mesh: {num_devices} devices are not divisible by data*fsdp*tensor "
        f"without the -1 axis ({fixed})"
      )
    shape[free[0]] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise ValueError(
      f"mesh: data*fsdp*tensor = {shape[0]}*{shape[1]}*{shape[2]} = "
      f"{math.prod(shape)} but {num_devices} devices are available"
    )
  return tuple(shape)


def make_mesh(
  data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), Auto axis types."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def batch_divisor(mesh: Mesh) -> int:
  """The global batch must be a multiple of this (the number of batch shards)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
