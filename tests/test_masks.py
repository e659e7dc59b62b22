"""The interval form of the attention rule and the block tables, against the dense rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neo_jax.ops import masks
from neo_jax.ops.layouts import Span, ids_from_arrays, random_batch, row_ids

LENGTH = 96  # fixed, so every example reuses one compilation
BATCH = 3


@st.composite
def spans(draw, branch=0, max_len=12):
  image = draw(st.booleans())
  return Span(draw(st.integers(1, max_len)), image=image, branch=branch)


@st.composite
def samples(draw):
  sample = draw(st.lists(spans(), min_size=1, max_size=5))  # text and images, any order
  if draw(st.booleans()):  # a preference pair: chosen then rejected, maybe without a prompt
    if draw(st.booleans()):
      sample = []
    for branch in (1, 2):
      sample += draw(st.lists(spans(branch=branch, max_len=8), min_size=1, max_size=2))
  return sample


@st.composite
def rows(draw):
  """A packed row of LENGTH tokens: several samples, then padding (or a filler sample)."""
  row, used = [], 0
  for sample in draw(st.lists(samples(), min_size=1, max_size=5)):
    n = sum(s.length for s in sample)
    if used + n > LENGTH:
      break
    row.append(sample)
    used += n
  if used < LENGTH and draw(st.booleans()):
    row.append([Span(LENGTH - used)])
  return row_ids(row, LENGTH)


batches = st.lists(rows(), min_size=BATCH, max_size=BATCH).map(
  lambda rs: ids_from_arrays(*(np.stack(x) for x in zip(*rs)))
)


@jax.jit
def _ranges_and_dense(ids):
  return masks.kv_ranges(ids), masks.dense_mask(ids)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _tables(ranges, block_q, block_kv):
  t = masks.block_ranges(ranges, block_q, block_kv)
  return t, masks.block_states(t.q_blocks, ranges.shape[1] // block_kv)


@settings(max_examples=150, deadline=None)
@given(batches)
def test_intervals_equal_dense_rule(ids):
  ranges, dense = _ranges_and_dense(ids)
  np.testing.assert_array_equal(masks.ranges_mask(ranges), dense)
  assert bool(masks.ranges_match_rule(ids).all())
  np.testing.assert_array_equal(masks.num_allowed(ranges), np.asarray(dense).sum(axis=(1, 2)))


@settings(max_examples=150, deadline=None)
@given(batches)
def test_intervals_are_canonical(ids):
  r = np.asarray(_ranges_and_dense(ids)[0])
  lo1, hi1, lo2, hi2 = np.moveaxis(r, -1, 0)
  assert (lo1 <= hi1).all() and (lo2 <= hi2).all()
  empty1, empty2 = hi1 == lo1, hi2 == lo2
  assert ((lo1 == 0) | ~empty1).all() and ((lo2 == 0) | ~empty2).all()  # empty is (0, 0)
  assert (~empty2 <= ~empty1).all()  # the second is used only with the first
  assert (hi1 < lo2)[~empty2].all()  # disjoint, ordered, with a gap
  q = np.arange(LENGTH)
  seg = np.asarray(ids.segment_ids)
  own = np.where(empty2, hi1, hi2)
  assert (own > q)[seg != 0].all()  # every real query sees itself
  assert (empty1 == (seg == 0)).all()  # padding sees nothing


@settings(max_examples=100, deadline=None)
@given(batches, st.sampled_from([(8, 8), (16, 32), (32, 16), (32, 32)]))
def test_block_tables_cover_the_rule(ids, blocks):
  block_q, block_kv = blocks
  ranges, dense = _ranges_and_dense(ids)
  tables, states = _tables(ranges, block_q, block_kv)
  states, dense = np.asarray(states), np.asarray(dense)
  b, nq, nk = states.shape
  blocked = dense.reshape(b, nq, block_q, nk, block_kv)
  any_allowed = blocked.any(axis=(2, 4))
  all_allowed = blocked.all(axis=(2, 4))
  # every allowed pair lies in a visited block; a block marked full is allowed throughout
  assert (states[any_allowed] != masks.BLOCK_SKIP).all()
  assert all_allowed[states == masks.BLOCK_FULL].all()
  # the key-block pass visits, for each key block, every query block that visits it
  kv = np.asarray(tables.kv_blocks)
  i = np.arange(nq)[None, :, None]
  inside = (i >= kv[:, None, :, 0]) & (i < kv[:, None, :, 1])
  assert inside[states != masks.BLOCK_SKIP].all()
  # the visit ranges are ordered: first before second, both inside [0, nk]
  qb = np.asarray(tables.q_blocks)
  s1, e1, s2, e2 = (qb[..., c] for c in range(4))
  second = e2 > s2
  assert ((0 <= s1) & (s1 <= e1) & (e1 <= nk)).all()
  assert ((e1 < s2) & (e2 <= nk))[second].all()
  assert ((s2 == nk) & (e2 == nk))[~second].all()


@functools.partial(jax.jit, static_argnums=(1, 2))
def _exact(ranges, block_q, block_kv):
  return masks.exact_block_states(ranges, block_q, block_kv)


@settings(max_examples=100, deadline=None)
@given(batches, st.sampled_from([(8, 8), (16, 32), (32, 16), (32, 32), (96, 8)]))
def test_exact_block_states_equal_the_blocked_rule(ids, blocks):
  # skip exactly where no pair is allowed, full exactly where every pair is: what the TPU
  # kernel's compressed grid visits; never more than the range hulls visit
  block_q, block_kv = blocks
  ranges, dense = _ranges_and_dense(ids)
  states = np.asarray(_exact(ranges, block_q, block_kv))
  dense = np.asarray(dense)
  b, nq, nk = states.shape
  blocked = dense.reshape(b, nq, block_q, nk, block_kv)
  want = np.where(
    blocked.any(axis=(2, 4)),
    np.where(blocked.all(axis=(2, 4)), masks.BLOCK_FULL, masks.BLOCK_PARTIAL),
    masks.BLOCK_SKIP,
  )
  np.testing.assert_array_equal(states, want)
  hull = np.asarray(_tables(ranges, block_q, block_kv)[1])
  assert (hull[states != masks.BLOCK_SKIP] != masks.BLOCK_SKIP).all()


def _walks(ranges, block_q, block_kv):
  t = masks.block_ranges(ranges, block_q, block_kv)
  nk, nq = ranges.shape[1] // block_kv, ranges.shape[1] // block_q
  qw = masks.q_block_walks(t.q_blocks, nk)
  kw = masks.kv_block_walks(t.q_blocks, t.kv_blocks, nk)
  full, part = masks.Q_WALK_FULL, masks.Q_WALK_PARTIAL
  return (
    t,
    masks.block_states(t.q_blocks, nk),
    masks.walk_blocks(qw[..., full:part], nk),
    masks.walk_blocks(qw[..., part : part + 8], nk),
    masks.walk_blocks(kw[..., :2], nq),
    masks.walk_blocks(kw[..., 2:6], nq),
  )


def _visited(walk_row):
  return [int(x) for x in walk_row if x >= 0]


@settings(max_examples=100, deadline=None)
@given(batches, st.sampled_from([(8, 8), (16, 32), (32, 16), (8, 16)]))
def test_walks_split_full_and_partial_blocks(ids, blocks):
  # The kernels' two loops: per query block, the full walk visits exactly the BLOCK_FULL kv
  # blocks and the partial walk exactly the BLOCK_PARTIAL ones, each once and in order (so no
  # more intervals than the table has slots); per key block, the full walk visits only query
  # blocks that see all of it and both walks together cover its query-block hull once.
  ranges, _ = _ranges_and_dense(ids)
  tables, *walks = _walks(ranges, *blocks)
  states, q_full, q_part, kv_full, kv_part = (np.asarray(x) for x in walks)
  b, nq, nk = states.shape
  for r in range(b):
    for i in range(nq):
      full, part = _visited(q_full[r, i]), _visited(q_part[r, i])
      assert full == np.flatnonzero(states[r, i] == masks.BLOCK_FULL).tolist()
      assert part == np.flatnonzero(states[r, i] == masks.BLOCK_PARTIAL).tolist()
    kv = np.asarray(tables.kv_blocks)[r]
    for j in range(nk):
      full, part = _visited(kv_full[r, j]), _visited(kv_part[r, j])
      assert all(states[r, i, j] == masks.BLOCK_FULL for i in full)
      assert sorted(full + part) == list(range(kv[j, 0], kv[j, 1]))


def test_interval_walk_compacts_empty_intervals():
  lo = jnp.array([[3, 5, 5, 9, 12, 20]])
  hi = jnp.array([[4, 5, 2, 11, 15, 20]])  # non-empty: [3, 4), [9, 11), [12, 15)
  walk = masks.interval_walk(lo, hi, 4)
  # count 6; ends 1, 3, 6; bases 3, 8, 9 and -6 (unused: no step reaches it)
  np.testing.assert_array_equal(walk, [[6, 1, 3, 6, 3, 8, 9, -6]])
  np.testing.assert_array_equal(masks.walk_blocks(walk, 8), [[3, 9, 10, 12, 13, 14, -1, -1]])


def test_worked_example():
  # sample 1: t3 i4 t2; sample 2: prompt t2, chosen t2, rejected t2; then 3 padding tokens
  samples = [
    [Span(3), Span(4, image=True), Span(2)],
    [Span(2), Span(2, branch=1), Span(2, branch=2)],
  ]
  ids = ids_from_arrays(*(x[None] for x in row_ids(samples, 18)))
  r = np.asarray(masks.kv_ranges(ids))[0]
  expected = [
    [0, 1, 0, 0],
    [0, 2, 0, 0],
    [0, 3, 0, 0],  # text: causal
    [0, 7, 0, 0],
    [0, 7, 0, 0],
    [0, 7, 0, 0],
    [0, 7, 0, 0],  # the image: up to its end
    [0, 8, 0, 0],
    [0, 9, 0, 0],
    [9, 10, 0, 0],
    [9, 11, 0, 0],  # prompt
    [9, 12, 0, 0],
    [9, 13, 0, 0],  # chosen: prompt + itself, one interval
    [9, 11, 13, 14],
    [9, 11, 13, 15],  # rejected: prompt, then its own run
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],  # padding
  ]
  np.testing.assert_array_equal(r[:15], expected[:15])
  np.testing.assert_array_equal(r[15:], expected[15:])


def test_block_skipping_on_a_packed_row():
  # two samples of 64 tokens (a 32-token image each) and 64 tokens of padding, blocks of 16
  sample = [Span(8), Span(32, image=True), Span(24)]
  ids = ids_from_arrays(*(x[None] for x in row_ids([sample, sample], 192)))
  tables, states = _tables(masks.kv_ranges(ids), 16, 16)
  states = np.asarray(states)[0]
  # a q block never visits the other sample or padding; image blocks see the whole image
  assert (states[:4, 4:] == masks.BLOCK_SKIP).all() and (states[4:8, :4] == masks.BLOCK_SKIP).all()
  assert (states[8:] == masks.BLOCK_SKIP).all()
  np.testing.assert_array_equal(states[0], [1, 1, 1, 0] + [0] * 8)  # text + image head: to 40
  np.testing.assert_array_equal(states[1], [2, 2, 1, 0] + [0] * 8)  # image: 0..39
  np.testing.assert_array_equal(states[3], [2, 2, 2, 1] + [0] * 8)  # causal diagonal
  visited = (states != masks.BLOCK_SKIP).sum()
  assert visited == 2 * 13, visited  # of 144 blocks
  np.testing.assert_array_equal(
    np.asarray(tables.kv_blocks)[0, :4], [[0, 4], [0, 4], [0, 4], [3, 4]]
  )


def test_rejected_queries_skip_the_chosen_blocks():
  samples = [[Span(16), Span(16, branch=1), Span(16, branch=2)]]
  ids = ids_from_arrays(*(x[None] for x in row_ids(samples, 64)))
  tables, states = _tables(masks.kv_ranges(ids), 16, 16)
  np.testing.assert_array_equal(np.asarray(tables.q_blocks)[0, 2, :4], [0, 1, 2, 3])
  np.testing.assert_array_equal(np.asarray(states)[0, 2], [2, 0, 1, 0])
  np.testing.assert_array_equal(np.asarray(tables.kv_blocks)[0, :3], [[0, 3], [1, 2], [2, 3]])


def test_ranges_match_rule_flags_an_unsupported_layout():
  # image id 1 appears in two spans separated by text: not an interval, must be reported
  seg = np.ones((1, 8), np.int32)
  img = np.array([[0, 1, 1, 0, 1, 1, 0, 0]], np.int32)
  ids = ids_from_arrays(seg, img)
  assert not bool(masks.ranges_match_rule(ids)[0])
  seg, img, branch = random_batch(np.random.default_rng(0), 2, 64)
  assert bool(masks.ranges_match_rule(ids_from_arrays(seg, img, branch)).all())


def test_explicit_positions_rejected():
  seg = jnp.ones((1, 4), jnp.int32)
  ids = masks.AttnIds(seg, seg * 0, None, jnp.arange(4)[None])
  with pytest.raises(ValueError, match="positions"):
    masks.kv_ranges(ids)
