"""The attention rule of a packed NEO batch, derived from ids in one place.

For query q and key k of one row (docs/architecture.md#the-attention-rule):

    allowed = seg[q] == seg[k] != 0
              and (branch[k] == 0 or branch[k] == branch[q])
              and (pos[k] <= pos[q] or image[q] == image[k] != 0)

`pos` is the index of the token in the sequence (or its cache slot), not the RoPE T index.
Text is causal, every image is bidirectional within itself, packed samples never see each
other, and a rejected branch never sees the chosen one (NEO's own mask, with its sources:
docs/reference/neo.md#attention-mask).

Three forms of the same rule: `dense_mask` ([B, Lq, Lk] bool, the reference), `kv_ranges`
(at most two key intervals per query, O(L), what the kernels evaluate in-kernel) and
`block_ranges` (per-block visit / fully-allowed tables that drive block skipping).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class AttnIds(NamedTuple):
  """Per-token ids that decide the mask, each int32 [B, L]."""

  segment_ids: jax.Array  # packed sample, 1.., 0 = padding / empty cache slot
  image_ids: jax.Array  # 0 = text; equal non-zero ids = the same image (within a segment)
  branch_ids: jax.Array | None = None  # 0 shared prompt, 1 chosen, 2 rejected; None = all 0
  positions: jax.Array | None = None  # sequence index / cache slot; None = arange(L)

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

  def slice(self, start: int, size: int) -> AttnIds:
    """Rows [start, start + size) of the sequence axis, positions kept absolute."""
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
    return AttnIds(
      take(self.segment_ids),
      take(self.image_ids),
      take(self.branches()),
      take(self.seq_positions()),
    )


def self_attention_ids(
  segment_ids: jax.Array, image_ids: jax.Array, branch_ids: jax.Array | None = None
) -> AttnIds:
  return AttnIds(
    segment_ids.astype(jnp.int32),
    image_ids.astype(jnp.int32),
    None if branch_ids is None else branch_ids.astype(jnp.int32),
    None,
  )


def dense_mask(q: AttnIds, kv: AttnIds | None = None) -> jax.Array:
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


# --- the rule as key intervals (what the kernels take) -----------------------------------------
#
# For a self-attention row whose segments, branch runs and images are contiguous spans, the keys
# a query q may see are the union of at most two intervals:
#
#   branch 0 (text, prompt, plain samples):  [segment start, max(q + 1, end of q's image))
#   branch b != 0 (chosen, rejected, ...):   [segment start, end of the branch-0 prompt)
#                                            + [start of q's branch run, max(q + 1, end of image))
#
# and the two merge into one when the branch run follows the prompt directly (the chosen branch).
# Padding queries (segment 0) see nothing. The layout the data pipeline produces satisfies the
# preconditions: every segment is one span, a segment is [prompt | branch 1 | branch 2 ...] with
# each branch one span, and every image is one span inside one branch (image ids unique within a
# segment). `ranges_match_rule` checks a batch against the dense rule.

RANGE_LO1, RANGE_HI1, RANGE_LO2, RANGE_HI2 = range(4)


def _shift_right(x: jax.Array, fill) -> jax.Array:
  return jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)


def _shift_left(x: jax.Array, fill) -> jax.Array:
  return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)


def kv_ranges(ids: AttnIds) -> jax.Array:
  """int32 [B, L, 4]: (lo1, hi1, lo2, hi2); query q of a self-attention row may see exactly the
  keys in [lo1, hi1) and [lo2, hi2). Empty intervals are (0, 0); when the second one is not
  empty, hi1 < lo2. O(L) per row, so kernels never need an L x L mask.
  """
  if ids.positions is not None:
    raise ValueError("kv_ranges: self-attention ids with explicit positions are not supported")
  seg = ids.segment_ids.astype(jnp.int32)
  branch = ids.branches().astype(jnp.int32)
  image = ids.image_ids.astype(jnp.int32)
  length = seg.shape[1]
  idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), seg.shape)

  seg_change = seg != _shift_right(seg, -1)
  run_change = seg_change | (branch != _shift_right(branch, -1))
  image_change = run_change | (image != _shift_right(image, -1))
  seg_start = jax.lax.cummax(jnp.where(seg_change, idx, 0), axis=1)
  run_start = jax.lax.cummax(jnp.where(run_change, idx, 0), axis=1)
  image_end = jax.lax.cummin(
    jnp.where(_shift_left(image_change, True), idx + 1, length), axis=1, reverse=True
  )
  hi = jnp.where(image != 0, jnp.maximum(image_end, idx + 1), idx + 1)
  # end of the branch-0 prompt of q's segment (for queries after it)
  last_shared = jax.lax.cummax(jnp.where((branch == 0) & (seg != 0), idx + 1, 0), axis=1)
  prompt_end = jnp.maximum(seg_start, last_shared)

  valid = seg != 0
  single = valid & ((branch == 0) | (prompt_end >= run_start))
  double = valid & ~single
  zero = jnp.zeros_like(idx)
  lo1 = jnp.where(valid, seg_start, zero)
  hi1 = jnp.where(single, hi, jnp.where(double, prompt_end, zero))
  lo2 = jnp.where(double, run_start, zero)
  hi2 = jnp.where(double, hi, zero)
  # a branch without a prompt in front: only the second interval is left; move it first
  move = double & (prompt_end <= seg_start)
  lo1, hi1 = jnp.where(move, lo2, lo1), jnp.where(move, hi2, hi1)
  lo2, hi2 = jnp.where(move, zero, lo2), jnp.where(move, zero, hi2)
  return jnp.stack([lo1, hi1, lo2, hi2], axis=-1)


def ranges_mask(ranges_bl4: jax.Array, kv_length: int | None = None) -> jax.Array:
  """bool [B, L, Lk] from `kv_ranges`: the mask the kernels compute block by block."""
  kv_length = ranges_bl4.shape[1] if kv_length is None else kv_length
  k = jnp.arange(kv_length, dtype=jnp.int32)
  r = ranges_bl4[:, :, None, :]
  return ((k >= r[..., RANGE_LO1]) & (k < r[..., RANGE_HI1])) | (
    (k >= r[..., RANGE_LO2]) & (k < r[..., RANGE_HI2])
  )


def ranges_match_rule(ids: AttnIds) -> jax.Array:
  """bool [B]: whether the interval form equals the dense rule on each row (O(L^2); a check for
  data pipelines and tests, not for the training step)."""
  return jnp.all(ranges_mask(kv_ranges(ids)) == dense_mask(ids), axis=(1, 2))


def num_allowed(ranges_bl4: jax.Array) -> jax.Array:
  """int32 [B]: the number of allowed (query, key) pairs of each row (the unmasked work)."""
  r = ranges_bl4
  width = (r[..., RANGE_HI1] - r[..., RANGE_LO1]) + (r[..., RANGE_HI2] - r[..., RANGE_LO2])
  return width.sum(axis=1)


# --- per-block ranges for block skipping ------------------------------------------------------
#
# Query block i visits the kv blocks [visit1_lo, visit1_hi) and [visit2_lo, visit2_hi) (the
# second empty as (nk, nk), the first empty as (0, 0)); within them, blocks in
# [full1_lo, full1_hi) or [full2_lo, full2_hi) are allowed for every query of the block, so the
# kernel skips the mask there. Key block j is visited by query blocks [q_lo, q_hi) (a hull: the
# dK/dV pass still checks each pair). All in block units; supersets of the exact sets are fine,
# the in-kernel mask stays exact.

(
  QB_VISIT1_LO,
  QB_VISIT1_HI,
  QB_VISIT2_LO,
  QB_VISIT2_HI,
  QB_FULL1_LO,
  QB_FULL1_HI,
  QB_FULL2_LO,
  QB_FULL2_HI,
) = range(8)
QB_FIELDS = 8


class BlockRanges(NamedTuple):
  """Scalar tables that drive block skipping (tiny: O(L / block) ints per row)."""

  q_blocks: jax.Array  # int32 [B, nq, 8], columns QB_*
  kv_blocks: jax.Array  # int32 [B, nk, 2]: (q_lo, q_hi) query-block range per key block


def _cdiv(x: jax.Array, d: int) -> jax.Array:
  return (x + d - 1) // d


def block_ranges(ranges_bl4: jax.Array, block_q: int, block_kv: int) -> BlockRanges:
  """Per-block tables from `kv_ranges` for a row padded to a multiple of both block sizes."""
  b, length, _ = ranges_bl4.shape
  if length % block_q or length % block_kv:
    raise ValueError(
      f"block_ranges: length {length} is not a multiple of block_q={block_q} "
      f"and block_kv={block_kv}"
    )
  nq, nk = length // block_q, length // block_kv
  r = ranges_bl4.reshape(b, nq, block_q, 4)

  def interval(lo, hi):
    nonempty = hi > lo
    any_ = nonempty.any(axis=-1)
    all_ = nonempty.all(axis=-1)
    # hull of the non-empty intervals, in kv blocks
    v_lo = jnp.where(nonempty, lo, length).min(axis=-1) // block_kv
    v_hi = _cdiv(jnp.where(nonempty, hi, 0).max(axis=-1), block_kv)
    v_lo, v_hi = jnp.where(any_, v_lo, nk), jnp.where(any_, v_hi, 0)
    # intersection over every query of the block, in whole kv blocks
    f_lo = _cdiv(lo.max(axis=-1), block_kv)
    f_hi = hi.min(axis=-1) // block_kv
    full = all_ & (f_hi > f_lo)
    return v_lo, v_hi, jnp.where(full, f_lo, 0), jnp.where(full, f_hi, 0)

  s1, e1, f1s, f1e = interval(r[..., RANGE_LO1], r[..., RANGE_HI1])
  s2, e2, f2s, f2e = interval(r[..., RANGE_LO2], r[..., RANGE_HI2])
  empty1, empty2 = e1 <= s1, e2 <= s2
  join = empty1 | empty2 | (s2 <= e1)
  a_lo = jnp.where(join, jnp.minimum(s1, s2), s1)
  a_hi = jnp.where(join, jnp.maximum(e1, e2), e1)
  a_empty = a_hi <= a_lo
  a_lo, a_hi = jnp.where(a_empty, 0, a_lo), jnp.where(a_empty, 0, a_hi)
  b_lo = jnp.where(join, nk, s2)
  b_hi = jnp.where(join, nk, e2)
  q_blocks = jnp.stack([a_lo, a_hi, b_lo, b_hi, f1s, f1e, f2s, f2e], axis=-1).astype(jnp.int32)

  visit = block_states(q_blocks, nk) > 0  # [B, nq, nk]
  any_q = visit.any(axis=1)
  first = jnp.argmax(visit, axis=1)
  last = nq - 1 - jnp.argmax(visit[:, ::-1, :], axis=1)
  kv_blocks = jnp.stack(
    [jnp.where(any_q, first, 0), jnp.where(any_q, last + 1, 0)], axis=-1
  ).astype(jnp.int32)
  return BlockRanges(q_blocks, kv_blocks)


BLOCK_SKIP, BLOCK_PARTIAL, BLOCK_FULL = 0, 1, 2


def block_states(q_blocks: jax.Array, num_kv_blocks: int) -> jax.Array:
  """int8 [B, nq, nk]: BLOCK_SKIP / BLOCK_PARTIAL / BLOCK_FULL, as the kernels decide them."""
  j = jnp.arange(num_kv_blocks, dtype=jnp.int32)
  col = lambda c: q_blocks[..., c, None]
  within = lambda lo, hi: (j >= col(lo)) & (j < col(hi))
  visit = within(QB_VISIT1_LO, QB_VISIT1_HI) | within(QB_VISIT2_LO, QB_VISIT2_HI)
  full = within(QB_FULL1_LO, QB_FULL1_HI) | within(QB_FULL2_LO, QB_FULL2_HI)
  return jnp.where(visit, jnp.where(full, BLOCK_FULL, BLOCK_PARTIAL), BLOCK_SKIP).astype(jnp.int8)


def exact_block_states(ranges_bl4: jax.Array, block_q: int, block_kv: int) -> jax.Array:
  """int8 [B, nq, nk]: the exact state of every (q block, kv block) pair from `kv_ranges`.

  BLOCK_SKIP where no query of the block may see any key of the block, BLOCK_FULL where every
  query may see every key, else BLOCK_PARTIAL. Unlike the range hulls of `block_ranges`, no
  pair is visited that the rule does not need (what a compressed grid walks). Costs
  O(L * nk) compares per row, fused into two reductions.
  """
  b, length, _ = ranges_bl4.shape
  if length % block_q or length % block_kv:
    raise ValueError(
      f"exact_block_states: length {length} is not a multiple of "
      f"block_q={block_q} and block_kv={block_kv}"
    )
  nq, nk = length // block_q, length // block_kv
  r = ranges_bl4.reshape(b, nq, block_q, 4)[..., None, :]  # [B, nq, bq, 1, 4]
  k_lo = jnp.arange(nk, dtype=jnp.int32) * block_kv  # first key of each kv block
  k_hi = k_lo + block_kv

  def touched_and_full(lo, hi):
    touched = (hi > lo) & (lo < k_hi) & (hi > k_lo)
    return touched, (lo <= k_lo) & (hi >= k_hi)  # the second implies a non-empty interval

  t1, f1 = touched_and_full(r[..., RANGE_LO1], r[..., RANGE_HI1])
  t2, f2 = touched_and_full(r[..., RANGE_LO2], r[..., RANGE_HI2])
  visit = (t1 | t2).any(axis=2)
  full = (f1 | f2).all(axis=2)
  return jnp.where(visit, jnp.where(full, BLOCK_FULL, BLOCK_PARTIAL), BLOCK_SKIP).astype(jnp.int8)


# --- walks: the visited blocks as a few intervals, fully allowed and partial apart ---------------
#
# A kernel that walks the fully allowed blocks and the partial ones in two loops needs no branch
# in either loop body: the first never masks, the second always does. Each walk covers at most
# `slots` intervals of blocks, stored as (count, ends[slots - 1], bases[slots]): step t of
# [0, count) visits block bases[k] + t, where k is the first slot with t < ends[k] (or the last).


def interval_walk(lo: jax.Array, hi: jax.Array, slots: int) -> jax.Array:
  """int32 [..., 2 * slots]: the walk over the non-empty intervals [lo_k, hi_k) (in order,
  disjoint; empty ones anywhere) of the last axis, at most `slots` of them non-empty."""
  n = jnp.maximum(hi - lo, 0).astype(jnp.int32)
  nonempty = n > 0
  rank = jnp.cumsum(nonempty, axis=-1) - 1
  pick = nonempty[..., None, :] & (rank[..., None, :] == jnp.arange(slots)[:, None])
  slot_n = jnp.where(pick, n[..., None, :], 0).sum(axis=-1)  # [..., slots]
  slot_lo = jnp.where(pick, lo[..., None, :].astype(jnp.int32), 0).sum(axis=-1)
  ends = jnp.cumsum(slot_n, axis=-1)
  starts = ends - slot_n
  return jnp.concatenate([ends[..., -1:], ends[..., :-1], slot_lo - starts], axis=-1).astype(
    jnp.int32
  )


def walk_blocks(walk: jax.Array, max_steps: int) -> jax.Array:
  """int32 [..., max_steps]: the blocks a walk visits, in order, -1 past its count (what a
  kernel loop computes step by step)."""
  slots = walk.shape[-1] // 2
  count, ends, bases = walk[..., 0], walk[..., 1:slots], walk[..., slots:]
  t = jnp.arange(max_steps, dtype=jnp.int32)
  k = (t[:, None] >= ends[..., None, :]).sum(axis=-1)  # [..., max_steps]
  base = jnp.take_along_axis(bases, k, axis=-1)
  return jnp.where(t < count[..., None], base + t, -1)


WALK_FULL_SLOTS = 2
WALK_PARTIAL_SLOTS = 4
Q_WALK_FIELDS = 16  # full walk (4) | partial walk (8) | padding (a power of two for Triton)
Q_WALK_FULL, Q_WALK_PARTIAL = 0, 2 * WALK_FULL_SLOTS


def q_block_walks(q_blocks: jax.Array, num_kv_blocks: int) -> jax.Array:
  """int32 [B, nq, Q_WALK_FIELDS]: per query block, the walk over its fully allowed kv blocks
  (at Q_WALK_FULL, 2 slots) and over its other visited kv blocks (at Q_WALK_PARTIAL, 4 slots),
  from `block_ranges`' q_blocks. Together they visit what `block_states` marks, once each."""
  col = lambda c: q_blocks[..., c]
  nk = num_kv_blocks
  f1s, f1e, f2s, f2e = (col(c) for c in (QB_FULL1_LO, QB_FULL1_HI, QB_FULL2_LO, QB_FULL2_HI))
  # Both full intervals lie inside the visited ones, the first before the second. Empty ones
  # are moved where they split nothing: x1 <= y1 <= x2 <= y2.
  f2_empty = f2e <= f2s
  x2, y2 = jnp.where(f2_empty, nk, f2s), jnp.where(f2_empty, nk, f2e)
  f1_empty = f1e <= f1s
  x1, y1 = jnp.where(f1_empty, x2, f1s), jnp.where(f1_empty, x2, f1e)

  def minus_full(lo, hi):  # [lo, hi) minus [x1, y1) and [x2, y2): three pieces, in order
    return [
      (lo, jnp.minimum(hi, x1)),
      (jnp.maximum(lo, y1), jnp.minimum(hi, x2)),
      (jnp.maximum(lo, y2), hi),
    ]

  # Visit interval 1 holds the first full interval, so at most 4 of the 6 pieces are non-empty.
  pieces = minus_full(col(QB_VISIT1_LO), col(QB_VISIT1_HI)) + minus_full(
    col(QB_VISIT2_LO), col(QB_VISIT2_HI)
  )
  stack = lambda xs: jnp.stack(xs, axis=-1)
  full = interval_walk(stack([f1s, f2s]), stack([f1e, f2e]), WALK_FULL_SLOTS)
  partial = interval_walk(
    stack([p[0] for p in pieces]), stack([p[1] for p in pieces]), WALK_PARTIAL_SLOTS
  )
  pad = jnp.zeros(
    full.shape[:-1] + (Q_WALK_FIELDS - full.shape[-1] - partial.shape[-1],), jnp.int32
  )
  return jnp.concatenate([full, partial, pad], axis=-1)


KV_WALK_FIELDS = 8  # full walk (2) | partial walk (4) | padding
KV_WALK_FULL, KV_WALK_PARTIAL = 0, 2


def kv_block_walks(q_blocks: jax.Array, kv_blocks: jax.Array, num_kv_blocks: int) -> jax.Array:
  """int32 [B, nk, KV_WALK_FIELDS]: per key block, the walk over the longest run of query
  blocks that see all of it (at KV_WALK_FULL, 1 slot) and over the rest of its query-block
  hull [q_lo, q_hi) (at KV_WALK_PARTIAL, 2 slots). Hull blocks that do not visit the key block
  are in the partial walk: masked throughout, they add exactly zero."""
  full = block_states(q_blocks, num_kv_blocks) == BLOCK_FULL  # [B, nq, nk]
  nq = full.shape[1]
  idx = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
  last_break = jax.lax.cummax(jnp.where(full, -1, idx), axis=1)
  run = jnp.where(full, idx - last_break, 0)  # length of the full run ending at each block
  end = jnp.argmax(run, axis=1).astype(jnp.int32)  # [B, nk]
  length = jnp.max(run, axis=1)
  q_lo, q_hi = kv_blocks[..., 0], kv_blocks[..., 1]
  r_lo = jnp.where(length > 0, end + 1 - length, q_hi)
  r_hi = jnp.where(length > 0, end + 1, q_hi)
  stack = lambda xs: jnp.stack(xs, axis=-1)
  full_walk = interval_walk(stack([r_lo]), stack([r_hi]), 1)
  partial = interval_walk(stack([q_lo, r_hi]), stack([r_lo, q_hi]), 2)
  pad = jnp.zeros(q_lo.shape + (KV_WALK_FIELDS - 2 - 4,), jnp.int32)
  return jnp.concatenate([full_walk, partial, pad], axis=-1)
