"""Native-RoPE positions (T, H, W) and image ids: the one place these facts are computed.

Rule (NEO, `get_thw_indexes`), per packed sample, for token ids x_0..x_{n-1}:

    s_i = 1 if x_{i-1} == <img> else 0            (s_0 = 0)
    n_i = 0 if x_i == <IMG_CONTEXT> else 1
    T_i = cumsum(s + n)_i - 1

so every text token advances T by one and all tokens of one image share T(<img>) + 1. Image
tokens take H = row and W = column of their 32-px block (restarting per image); text tokens
take H = W = 0. T restarts at 0 for every packed sample (segment). In a preference row
[prompt | chosen | rejected] the rejected branch restarts T where the chosen branch started.

The functions work on NumPy arrays (data pipeline) and on jax arrays (model, inference), for a
single row [L] or a batch [B, L].
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # the data pipeline imports this module too; jax is optional there
  import jax
  import jax.numpy as jnp
except ImportError:  # pragma: no cover
  jax = None
  jnp = None

Array = Any


def _xp(x: Array):
  return jnp if jax is not None and isinstance(x, jax.Array) else np


def _cummax(x: Array, xp) -> Array:
  if xp is np:
    return np.maximum.accumulate(x, axis=-1)
  return jax.lax.cummax(x, axis=x.ndim - 1)


def _shift_right(x: Array, fill, xp) -> Array:
  pad = xp.full(x.shape[:-1] + (1,), fill, dtype=x.dtype)
  return xp.concatenate([pad, x[..., :-1]], axis=-1)


def _segment_cumsum(values: Array, segment_ids: Array, xp) -> Array:
  """Inclusive cumsum along the last axis that restarts wherever segment_ids changes."""
  total = xp.cumsum(values, axis=-1)
  starts = segment_ids != _shift_right(segment_ids, -1, xp)
  offset = _cummax(xp.where(starts, total - values, 0), xp)
  return total - offset


def native_rope_positions(
  input_ids: Array,
  segment_ids: Array,
  visual_rc: Array,
  branch_ids: Array | None = None,
  *,
  img_context_id: int,
  img_start_id: int,
) -> Array:
  """T/H/W positions, int32 [..., 3, L].

  Args:
    input_ids: int [..., L] token ids, `<IMG_CONTEXT>` where a visual token goes.
    segment_ids: int [..., L] packed sample number (1, 2, ...), 0 for padding.
    visual_rc: int [..., N, 2] (row, column) of each visual token on its image's 32-px grid, in
      the order of the `<IMG_CONTEXT>` tokens of the row.
    branch_ids: optional int [..., L]: 0 shared prompt, 1 chosen, 2 rejected.
  """
  xp = _xp(input_ids)
  input_ids = xp.asarray(input_ids)
  segment_ids = xp.asarray(segment_ids)
  is_ctx = input_ids == img_context_id
  same_seg_as_prev = segment_ids == _shift_right(segment_ids, -1, xp)
  after_img = (_shift_right(input_ids, -1, xp) == img_start_id) & same_seg_as_prev
  step = after_img.astype(np.int32) + (~is_ctx).astype(np.int32)
  t = _segment_cumsum(step, segment_ids, xp)
  if branch_ids is not None:
    branch_ids = xp.asarray(branch_ids)
    chosen_steps = _segment_cumsum(step * (branch_ids == 1), segment_ids, xp)
    t = t - xp.where(branch_ids == 2, chosen_steps, 0)
  t = t - 1

  visual_index = xp.cumsum(is_ctx.astype(np.int32), axis=-1) - 1
  n_visual = visual_rc.shape[-2]
  gather_index = xp.clip(visual_index, 0, max(n_visual - 1, 0))
  rc = xp.asarray(visual_rc)
  if n_visual == 0:
    h = w = xp.zeros_like(t)
  else:
    h = xp.take_along_axis(rc[..., 0], gather_index, axis=-1)
    w = xp.take_along_axis(rc[..., 1], gather_index, axis=-1)
  valid = segment_ids != 0
  h = xp.where(is_ctx & valid, h, 0)
  w = xp.where(is_ctx & valid, w, 0)
  t = xp.where(valid, t, 0)
  return xp.stack([t, h, w], axis=-2).astype(np.int32)


def image_ids(input_ids: Array, t_positions: Array, img_context_id: int) -> Array:
  """int32 [..., L]: T + 1 on `<IMG_CONTEXT>` tokens, 0 elsewhere.

  Together with the segment (and branch) ids this identifies each image: all tokens of one
  image share T, and no two images of one sample (branch) do.
  """
  xp = _xp(input_ids)
  return xp.where(xp.asarray(input_ids) == img_context_id, xp.asarray(t_positions) + 1, 0).astype(
    np.int32
  )


def grid_rc(grid_h: int, grid_w: int) -> np.ndarray:
  """(row, column) of each token of an image with a (grid_h, grid_w) 32-px grid, row-major."""
  rows, cols = np.divmod(np.arange(grid_h * grid_w, dtype=np.int32), grid_w)
  return np.stack([rows, cols], axis=-1)
