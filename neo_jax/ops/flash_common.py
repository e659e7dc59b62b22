"""What the Pallas flash kernels share: padding, the interval tables, numerics constants.

Both kernels take q [B, L, Hq, Dqk], k [B, L, Hkv, Dqk], v [B, L, Hkv, Dv] of one
self-attention row set, pad L to a multiple of the block sizes (padding tokens are segment 0,
so no query sees them and they see nothing), derive the per-query key intervals and the block
tables once (`masks.kv_ranges`, `masks.block_ranges`) and slice the padding off the output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from neo_jax.ops import masks
from neo_jax.ops.masks import AttnIds

# Masked scores are -inf, so exp(s - m) is exactly 0 for them with no select on p. The running
# max starts at a finite floor below any real logit, so m_prev - m_next and s - m never meet
# inf - inf, and a row that has seen no allowed key yet keeps l = 0 (its output is 0).
MASK_VALUE = float("-inf")
M_INIT = -1e30

# Names of what a flash kernel's forward pass keeps for its backward pass (the output and the
# row logsumexp), so that a remat policy can save them (model.neo.REMAT_POLICIES,
# "dots_attention") and the backward pass does not run the forward kernel again.
SAVED_NAMES = ("attention_out", "attention_lse")


def name_saved(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`out` and `lse` tagged with SAVED_NAMES (an identity for everything but remat)."""
  return checkpoint_name(out, SAVED_NAMES[0]), checkpoint_name(lse, SAVED_NAMES[1])


def matmul_precision(dtype) -> jax.lax.Precision | None:
  """float32 products at full precision (TPUs otherwise round their inputs to bfloat16),
  others at the default; the kernels and the reference agree on it."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def fit_block(block: int, length: int, minimum: int) -> int:
  """The block size for a row of `length` tokens: at most `block`, a power of two, and no
  larger than the row needs (short test rows run as one block)."""
  return max(minimum, min(block, next_pow2(length)))


class Layout(NamedTuple):
  """Static facts of one call."""

  batch: int
  length: int  # the caller's L
  padded: int  # L rounded up to the block sizes
  num_q_heads: int
  num_kv_heads: int
  head_dim_qk: int
  head_dim_v: int

  @property
  def group(self) -> int:
    return self.num_q_heads // self.num_kv_heads


def layout_of(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> Layout:
  b, l, hq, dqk = q.shape
  if k.shape[:2] != (b, l) or v.shape[:2] != (b, l) or k.shape[2] != v.shape[2]:
    raise ValueError(
      f"flash attention: self-attention shapes expected, got q{q.shape} k{k.shape} v{v.shape}"
    )
  if k.shape[3] != dqk:
    raise ValueError(f"flash attention: q and k widths differ: {dqk} vs {k.shape[3]}")
  hkv = k.shape[2]
  if hq % hkv:
    raise ValueError(f"flash attention: {hq} query heads not a multiple of {hkv} kv heads")
  return Layout(b, l, round_up(l, block), hq, hkv, dqk, v.shape[3])


def pad_length(x: jax.Array, padded: int, axis: int = 1) -> jax.Array:
  extra = padded - x.shape[axis]
  if extra == 0:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, extra)
  return jnp.pad(x, pads)


def pad_last(x: jax.Array, multiple: int) -> jax.Array:
  """Zero-pads the last axis (head width) to a multiple; zeros change no score or output."""
  extra = round_up(x.shape[-1], multiple) - x.shape[-1]
  if extra == 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


class Tables(NamedTuple):
  """Everything the kernels need to know about the mask, O(L) ints per row."""

  ranges: jax.Array  # int32 [B, Lp, 4] per-query key intervals
  q_blocks: jax.Array  # int32 [B, nq, 8] (masks.QB_*)
  kv_blocks: jax.Array  # int32 [B, nk, 2]


def padded_ranges(ids: AttnIds, padded: int) -> jax.Array:
  """`masks.kv_ranges` of the row set padded to `padded` tokens (padding is segment 0)."""
  seg = pad_length(ids.segment_ids.astype(jnp.int32), padded)
  img = pad_length(ids.image_ids.astype(jnp.int32), padded)
  branch = None if ids.branch_ids is None else pad_length(ids.branch_ids.astype(jnp.int32), padded)
  return masks.kv_ranges(AttnIds(seg, img, branch, None))


def tables_for(ids: AttnIds, padded: int, block_q: int, block_kv: int) -> Tables:
  ranges = padded_ranges(ids, padded)
  blocks = masks.block_ranges(ranges, block_q, block_kv)
  return Tables(ranges, blocks.q_blocks, blocks.kv_blocks)


def on_backend(name: str) -> bool:
  return jax.default_backend() == name
