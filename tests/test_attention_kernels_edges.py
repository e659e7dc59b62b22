"""Kernel edge cases: skipped blocks are never computed, padding queries, gaps in the dk/dv
query-block range (interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_kernels import (
  KERNELS,
  TOL,
  check_against_reference,
  make_inputs,
  rel_err,
  value_and_grads,
)

from neo_jax.ops import masks, reference
from neo_jax.ops.layouts import Span, ids_from_arrays, row_ids


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_skipped_blocks_are_never_computed(impl):
  # two samples in the first 128 tokens, then 128 tokens of padding (two whole 64-blocks).
  # Poisoning k, v there with NaN must not reach any output or gradient: those blocks are
  # skipped, not masked. Padding queries get exactly zero output and zero gradients.
  samples = [
    [Span(10), Span(30, image=True), Span(24)],
    [Span(8), Span(20, branch=1), Span(30, branch=2)],
  ]
  seg, img, branch = row_ids(samples, 256)
  ids = ids_from_arrays(seg[None], img[None], branch[None])
  q, k, v, d_out, _ = make_inputs(2, 1, 256, 2, 1, 32, 16, jnp.float32)
  k = k.at[:, 128:].set(jnp.nan)
  v = v.at[:, 128:].set(jnp.nan)
  fn = KERNELS[impl]((64, 64))
  out, (dq, dk, dv) = jax.jit(
    lambda q, k, v, g: value_and_grads(lambda q, k, v: fn(q, k, v, ids, scale=0.25), q, k, v, g)
  )(q, k, v, d_out)
  clean = lambda x: x.at[:, 128:].set(0.0)
  want = reference.attention_dense(q, clean(k), clean(v), ids, scale=0.25)
  assert rel_err(out, want) <= 1e-5
  assert np.isfinite(np.asarray(dq)).all()
  assert np.isfinite(np.asarray(dk[:, :128])).all() and np.isfinite(np.asarray(dv[:, :128])).all()
  np.testing.assert_array_equal(np.asarray(out[:, 128:]), 0.0)
  np.testing.assert_array_equal(np.asarray(dq[:, 128:]), 0.0)


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_query_block_inside_the_dkv_range_that_skips_the_key_block(impl):
  # prompt (with an image), chosen (with an image), rejected, then a second sample. With
  # 16-token blocks, key block 2 (chosen) is visited by query blocks 1-3 and 5 (5 straddles
  # the rejected branch and the next sample) but not by 4 (rejected only): the dk/dv pass
  # walks 1..5 and must add nothing for block 4.
  samples = [
    [
      Span(2),
      Span(20, image=True),
      Span(8),
      Span(14, image=True, branch=1),
      Span(19, branch=1),
      Span(19, branch=2),
    ],
    [Span(46)],
  ]
  seg, img, branch = row_ids(samples, 128)
  ids = ids_from_arrays(seg[None], img[None], branch[None])
  tables = masks.block_ranges(masks.kv_ranges(ids), 16, 16)
  states = np.asarray(masks.block_states(tables.q_blocks, 8))[0]
  np.testing.assert_array_equal(np.asarray(tables.kv_blocks)[0, 2], [1, 6])
  assert states[4, 2] == masks.BLOCK_SKIP and states[5, 2] != masks.BLOCK_SKIP
  q, k, v, d_out, _ = make_inputs(7, 1, 128, 2, 1, 32, 16, jnp.float32)
  check_against_reference(KERNELS[impl]((16, 16)), q, k, v, d_out, ids, 0.25, TOL[jnp.float32])


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_rows_of_mostly_full_blocks(impl):
  # long images and long texts at 16-token blocks: most visited blocks are allowed for every
  # query (the unmasked loops), the rest partial (the masked loops); GQA group of 4 (the dk/dv
  # pass loops over 4 query heads per kv head)
  samples = [
    [Span(4), Span(120, image=True), Span(90)],
    [Span(40, image=True), Span(9, branch=1), Span(7, branch=2)],
    [Span(40)],
  ]
  seg, img, branch = row_ids(samples, 320)
  ids = ids_from_arrays(seg[None], img[None], branch[None])
  tables = masks.block_ranges(masks.kv_ranges(ids), 16, 16)
  states = np.asarray(masks.block_states(tables.q_blocks, 20))
  assert (states == masks.BLOCK_FULL).sum() > (states == masks.BLOCK_PARTIAL).sum()
  q, k, v, d_out, _ = make_inputs(8, 1, 320, 8, 2, 32, 16, jnp.float32)
  check_against_reference(KERNELS[impl]((16, 16)), q, k, v, d_out, ids, 0.3, TOL[jnp.float32])
