"""The attention rule of a packed NEO batch, derived from ids in one place.

For query q and key k of one row (DESIGN.md):

    allowed = seg[q] == seg[k] != 0
              and (branch[k] == 0 or branch[k] == branch[q])
              and (pos[k] <= pos[q] or image[q] == image[k] != 0)

`pos` is the index of the token in the sequence (or its cache slot), not the RoPE T index.
Text is causal, every image is bidirectional within itself, packed samples never see each
other, and a rejected branch never sees the chosen one.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class AttnIds(NamedTuple):
  """Per-token ids that decide the mask, each int32 [B, L]."""

  segment_ids: jax.Array  # packed sample, 1.., 0 = padding / empty cache slot
  image_ids: jax.Array  # 0 = text; equal non-zero ids = the same image (within a segment)
  branch_ids: Optional[jax.Array] = None  # 0 shared prompt, 1 chosen, 2 rejected; None = all 0
  positions: Optional[jax.Array] = None  # sequence index / cache slot; None = arange(L)

  @property
  def length(self) -> int:
    return self.segment_ids.shape[-1]

  def branches(self) -> jax.Array:
    if self.branch_ids is None:
      return jnp.zeros_like(self.segment_ids)
    return self.branch_ids

  def seq_positions(self) -> jax.Array:
    if self.positions is None:
      return jnp.broadcast_to(jnp.arange(self.length, dtype=jnp.int32), self.segment_ids.shape)
    return self.positions

  def slice(self, start: int, size: int) -> "AttnIds":
    """Rows [start, start + size) of the sequence axis, positions kept absolute."""
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
    return AttnIds(take(self.segment_ids), take(self.image_ids), take(self.branches()),
                   take(self.seq_positions()))


def self_attention_ids(segment_ids: jax.Array, image_ids: jax.Array,
                       branch_ids: Optional[jax.Array] = None) -> AttnIds:
  return AttnIds(segment_ids.astype(jnp.int32), image_ids.astype(jnp.int32),
                 None if branch_ids is None else branch_ids.astype(jnp.int32), None)


def dense_mask(q: AttnIds, kv: Optional[AttnIds] = None) -> jax.Array:
  """bool [B, Lq, Lk]: the reference form of the rule, True where q may attend to k."""
  kv = q if kv is None else kv
  qs, ks = q.segment_ids[:, :, None], kv.segment_ids[:, None, :]
  qb, kb = q.branches()[:, :, None], kv.branches()[:, None, :]
  qp, kp = q.seq_positions()[:, :, None], kv.seq_positions()[:, None, :]
  qi, ki = q.image_ids[:, :, None], kv.image_ids[:, None, :]
  same_segment = (qs == ks) & (qs != 0)
  visible_branch = (kb == 0) | (kb == qb)
  same_image = (qi == ki) & (qi != 0)
  return same_segment & visible_branch & ((kp <= qp) | same_image)
