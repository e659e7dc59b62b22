"""HF NEO model inputs (input_ids, flat pixel_values, grid_hw) -> one row of the batch contract.

The PyTorch model takes every image's 16-px patches row-major over its 16-px grid, each
flattened (c, py, px), all images concatenated, with `grid_hw` = (h16, w16) per image. Our
batch holds, per visual token, its 2x2 block of patches in (dy, dx) order and the token's
(row, column) on the 32-px grid. Golden-logit checks and inference on HF-style inputs use it.
"""

from __future__ import annotations

import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.errors import UserError
from neo_jax.positions import grid_rc, native_rope_positions


def patches_to_token_blocks(
  pixel_values: np.ndarray, grid_hw: np.ndarray, merge: int = 2
) -> tuple[np.ndarray, np.ndarray]:
  """[N16, P] row-major patches of each image -> ([N, merge^2, P] blocks, [N, 2] (row, col))."""
  pixel_values = np.asarray(pixel_values)
  grid_hw = np.asarray(grid_hw, dtype=np.int64).reshape(-1, 2)
  patch_dim = pixel_values.shape[-1]
  blocks, rcs, start = [], [], 0
  for i, (h16, w16) in enumerate(grid_hw):
    if h16 % merge or w16 % merge or h16 <= 0 or w16 <= 0:
      raise UserError(
        f"grid_hw[{i}] = ({h16}, {w16}): each side must be a positive multiple of {merge}"
      )
    n = int(h16 * w16)
    if start + n > len(pixel_values):
      raise UserError(
        f"grid_hw needs {int(grid_hw.prod(-1).sum())} patches, pixel_values has {len(pixel_values)}"
      )
    grid = pixel_values[start : start + n].reshape(
      h16 // merge, merge, w16 // merge, merge, patch_dim
    )
    blocks.append(grid.transpose(0, 2, 1, 3, 4).reshape(-1, merge * merge, patch_dim))
    rcs.append(grid_rc(h16 // merge, w16 // merge))
    start += n
  if start != len(pixel_values):
    raise UserError(f"grid_hw covers {start} patches, pixel_values has {len(pixel_values)}")
  if not blocks:
    return (np.zeros((0, merge * merge, patch_dim), pixel_values.dtype), np.zeros((0, 2), np.int32))
  return np.concatenate(blocks), np.concatenate(rcs).astype(np.int32)


def hf_inputs_to_batch(
  input_ids: np.ndarray,
  pixel_values: np.ndarray | None,
  grid_hw: np.ndarray | None,
  config: NeoConfig,
  visual_budget: int | None = None,
) -> dict[str, np.ndarray]:
  """One sequence of HF NEO inputs -> a batch of one row (numpy, batch-contract names).

  Returns input_ids/segment_ids [1, L], positions [1, 3, L], and when there are images,
  pixels [1, N, 4, 768] (the input dtype: normalised float stays float) and pixel_rc [1, N, 2].
  `visual_budget` pads N with zero slots to a fixed size (fixed shapes, one compilation).
  """
  ids = np.asarray(input_ids, dtype=np.int32).reshape(-1)
  n_ctx = int((ids == config.img_context_token_id).sum())
  batch = {"input_ids": ids[None], "segment_ids": np.ones((1, ids.size), np.int32)}
  if pixel_values is None or np.asarray(pixel_values).size == 0:
    if n_ctx:
      raise UserError(f"input_ids hold {n_ctx} <IMG_CONTEXT> tokens but there are no pixels")
    rc = np.zeros((0, 2), np.int32)
  else:
    pixel_values = np.asarray(pixel_values)
    if pixel_values.ndim != 2 or pixel_values.shape[1] != config.patch_dim:
      raise UserError(
        f"pixel_values: expected [N_patches, {config.patch_dim}], got {list(pixel_values.shape)}"
      )
    blocks, rc = patches_to_token_blocks(pixel_values, grid_hw, config.merge_size)
    if len(blocks) != n_ctx:
      raise UserError(
        f"input_ids hold {n_ctx} <IMG_CONTEXT> tokens, the images give {len(blocks)} visual tokens"
      )
    if visual_budget is not None:
      if visual_budget < len(blocks):
        raise UserError(f"{len(blocks)} visual tokens exceed the budget of {visual_budget}")
      pad = visual_budget - len(blocks)
      blocks = np.concatenate([blocks, np.zeros((pad,) + blocks.shape[1:], blocks.dtype)])
      rc = np.concatenate([rc, np.zeros((pad, 2), np.int32)])
    batch["pixels"], batch["pixel_rc"] = blocks[None], rc[None]
  batch["positions"] = native_rope_positions(
    batch["input_ids"],
    batch["segment_ids"],
    rc[None],
    img_context_id=config.img_context_token_id,
    img_start_id=config.img_start_token_id,
  )
  return batch
