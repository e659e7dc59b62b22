"""The TPU kernel's compressed grid: step tables, step counts against the mask, the shapes
Mosaic gets (forced in interpret mode), VMEM and SMEM bounds, lowering for TPU."""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_attention_kernels import LAYOUT, TOL, check_against_reference, make_inputs

from neo_jax.errors import UserError
from neo_jax.ops import flash_common as fc
from neo_jax.ops import masks, pallas_tpu
from neo_jax.ops.layouts import Span, ids_from_arrays, random_batch, row_ids

MIB = 1 << 20


def blocked_rule(ids, padded, block_q, block_kv):
  """(any allowed, all allowed) per (q block, kv block), from the dense rule: [B, nq, nk]."""
  seg, img = (fc.pad_length(x, padded) for x in (ids.segment_ids, ids.image_ids))
  branch = None if ids.branch_ids is None else fc.pad_length(ids.branch_ids, padded)
  dense = np.asarray(masks.dense_mask(masks.AttnIds(seg, img, branch, None)))
  b = dense.shape[0]
  blocked = dense.reshape(b, padded // block_q, block_q, padded // block_kv, block_kv)
  return blocked.any(axis=(2, 4)), blocked.all(axis=(2, 4))


_decode = jax.jit(pallas_tpu.decode_step)


def decode(words, count):
  return {name: np.asarray(x)[:count] for name, x in _decode(jnp.asarray(words))._asdict().items()}


def test_step_table_lists_visited_pairs_in_order():
  # outer block 0 visits inner 0 (full) and 2 (partial); 1 visits nothing (one write-only
  # step that fetches the inner block of the step before it); 2 visits inner 1
  states = jnp.asarray([[[2, 0, 1], [0, 0, 0], [0, 1, 0]]], jnp.int8)
  table = jax.jit(pallas_tpu.step_table)(states)
  assert table.words.shape == (1, 9) and int(table.counts[0]) == 4
  got = decode(np.asarray(table.words)[0], 4)
  np.testing.assert_array_equal(got["outer"], [0, 0, 1, 2])
  np.testing.assert_array_equal(got["inner"], [0, 2, 2, 1])
  np.testing.assert_array_equal(
    got["state"], [masks.BLOCK_FULL, masks.BLOCK_PARTIAL, masks.BLOCK_SKIP, masks.BLOCK_PARTIAL]
  )
  np.testing.assert_array_equal(got["first"], [True, False, True, True])
  np.testing.assert_array_equal(got["last"], [False, True, True, True])


def test_step_tables_of_a_random_batch_match_the_mask():
  # every (outer, inner) pair the rule needs appears once, in order, with its exact state;
  # an outer block with none has exactly one write-only step
  seg, img, branch = random_batch(np.random.default_rng(1), 3, 256, **LAYOUT)
  ids = ids_from_arrays(seg, img, branch)
  plan = jax.jit(pallas_tpu.plan_for, static_argnums=(1, 2, 3))(ids, 256, 32, 16)
  any_, all_ = blocked_rule(ids, 256, 32, 16)
  for table, any_bo, all_bo in (
    (plan.fwd, any_, all_),
    (plan.dkv, any_.swapaxes(1, 2), all_.swapaxes(1, 2)),
  ):
    words, counts = np.asarray(table.words), np.asarray(table.counts)
    for b in range(3):
      got = decode(words[b], counts[b])
      real = got["state"] != masks.BLOCK_SKIP
      pairs = list(zip(got["outer"][real], got["inner"][real]))
      assert pairs == sorted(zip(*np.nonzero(any_bo[b])))
      full = np.where(all_bo[b][got["outer"], got["inner"]], masks.BLOCK_FULL, masks.BLOCK_PARTIAL)
      np.testing.assert_array_equal(got["state"][real], full[real])
      empty = ~any_bo[b].any(axis=1)
      np.testing.assert_array_equal(np.sort(got["outer"][~real]), np.nonzero(empty)[0])
      starts = np.r_[True, got["outer"][1:] != got["outer"][:-1]]
      ends = np.r_[got["outer"][1:] != got["outer"][:-1], True]
      np.testing.assert_array_equal(got["first"], starts)
      np.testing.assert_array_equal(got["last"], ends)


@pytest.fixture
def grid_steps(monkeypatch):
  """Records, for every pallas_call the TPU kernel runs, the number of steps of its grid."""
  seen = collections.defaultdict(list)
  real = pallas_tpu.pl.pallas_call

  def recording(kernel, *, grid_spec, name, **kw):
    call = real(kernel, grid_spec=grid_spec, name=name, **kw)

    def run(*args):
      steps = functools.reduce(lambda a, d: a * d, grid_spec.grid, 1)
      jax.debug.callback(lambda n: seen[name].append(int(n)), steps)
      return call(*args)

    return run

  monkeypatch.setattr(pallas_tpu.pl, "pallas_call", recording)
  return seen


def test_grid_steps_equal_the_visited_blocks(grid_steps):
  # 2 rows (one pallas_call per row), the shapes Mosaic gets (widths 64 / 32 padded to 128,
  # blocks of 128 x 256), GQA 4/2; values and gradients against the reference, and the grid
  # of each row has exactly heads x (blocks the rule needs + blocks that see nothing), counted
  # independently from the dense rule
  b, length, hq, hkv, bq, bk = 2, 600, 4, 2, 128, 256
  q, k, v, d_out, ids = make_inputs(21, b, length, hq, hkv, 64, 32, jnp.float32, **LAYOUT)
  fn = functools.partial(
    pallas_tpu.flash_attention, block_sizes=pallas_tpu.BlockSizes(bq, bk), tpu_shapes=True
  )
  check_against_reference(fn, q, k, v, d_out, ids, 0.2, TOL[jnp.float32])
  any_, _ = blocked_rule(ids, fc.round_up(length, bk), bq, bk)
  visited = any_.sum(axis=(1, 2))
  want_q = hq * (visited + (~any_.any(axis=2)).sum(axis=1))
  want_kv = hq * (visited + (~any_.any(axis=1)).sum(axis=1))  # Hkv x group = Hq
  assert sorted(grid_steps["neo_flash_fwd"]) == sorted(want_q.tolist())
  assert sorted(grid_steps["neo_flash_dq"]) == sorted(want_q.tolist())
  assert sorted(grid_steps["neo_flash_dkv"]) == sorted(want_kv.tolist())
  assert visited.sum() < any_.size / 2  # most pairs are skipped: the test has teeth


TPU_SHAPE_CASES = {
  # widths 96 / 48 padded to 128 lanes, blocks 256 x 128, 2 rows
  "f32-256x128": dict(dtype=jnp.float32, shape=(2, 520, 2, 1, 96, 48), blocks=(256, 128)),
  # NEO's widths (256 / 128: no padding) in bf16, default blocks for L = 900 (256 x 256)
  "bf16-default": dict(dtype=jnp.bfloat16, shape=(1, 900, 2, 1, 256, 128), blocks=None),
}


@pytest.mark.parametrize("case", sorted(TPU_SHAPE_CASES))
def test_tpu_shapes_in_interpret_mode(case):
  c = TPU_SHAPE_CASES[case]
  q, k, v, d_out, ids = make_inputs(
    22,
    *c["shape"],
    c["dtype"],
    image_len=(20, 200),
    text_len=(4, 60),
    preference_prob=0.5,
    max_samples=5,
  )
  sizes = c["blocks"] and pallas_tpu.BlockSizes(*c["blocks"])
  fn = functools.partial(pallas_tpu.flash_attention, block_sizes=sizes, tpu_shapes=True)
  check_against_reference(fn, q, k, v, d_out, ids, 128**-0.5, TOL[c["dtype"]])


def test_tpu_shapes_under_tpu_interpret_params():
  # the TPU interpreter simulates DMAs and VMEM, raises on out-of-bounds block indices and
  # fills uninitialised memory with NaN: an output block no step wrote would show. The row
  # ends in 128 tokens of padding (a q block and a kv block that see nothing)
  samples = [
    [Span(10), Span(60, image=True), Span(30)],
    [Span(20), Span(40, branch=1), Span(24, branch=2)],
  ]
  seg, img, branch = row_ids(samples, 312)
  ids = ids_from_arrays(seg[None], img[None], branch[None])
  q, k, v, d_out, _ = make_inputs(23, 1, 312, 2, 1, 32, 16, jnp.float32)
  fn = functools.partial(
    pallas_tpu.flash_attention,
    block_sizes=pallas_tpu.BlockSizes(128, 128),
    tpu_shapes=True,
    interpret=pltpu.InterpretParams(),
  )
  out, grads = check_against_reference(fn, q, k, v, d_out, ids, 0.25, TOL[jnp.float32])
  np.testing.assert_array_equal(np.asarray(out[:, 224:]), 0.0)
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g[:, 224:]), 0.0)


def test_default_blocks_are_lane_multiples_and_fit_smem():
  lengths = [longest for longest, _ in pallas_tpu.DEFAULT_BLOCKS[:-1]] + [1 << 17]
  previous = 0
  for length in lengths:
    sizes = pallas_tpu.default_block_sizes(length)
    assert sizes.block_q % 128 == 0 and sizes.block_kv % 128 == 0
    assert sizes.block_q * sizes.block_kv >= previous  # larger rows, larger blocks
    previous = sizes.block_q * sizes.block_kv
    pallas_tpu.check_table_bounds(
      fc.round_up(length, max(sizes.block_q, sizes.block_kv)), sizes.block_q, sizes.block_kv
    )
  assert pallas_tpu.default_block_sizes(100) == pallas_tpu.DEFAULT_BLOCKS[0][1]


def test_step_tables_beyond_smem_are_refused():
  # 64k tokens in 128 x 128 blocks: 512 x 512 step words = 1 MiB of SMEM per row
  with pytest.raises(UserError, match="SMEM"):
    pallas_tpu.check_table_bounds(1 << 16, 128, 128)
  shapes = [jax.ShapeDtypeStruct((1, 1 << 16, 1, 128), jnp.bfloat16)] * 3
  ids = masks.AttnIds(jnp.ones((1, 1 << 16), jnp.int32), jnp.zeros((1, 1 << 16), jnp.int32))
  with pytest.raises(UserError, match="larger blocks"):
    jax.eval_shape(
      lambda q, k, v: pallas_tpu.flash_attention(
        q, k, v, ids, scale=1.0, block_sizes=pallas_tpu.BlockSizes(128, 128), interpret=False
      ),
      *shapes,
    )


def test_vmem_limit_follows_the_blocks():
  neo = lambda bq, bk: pallas_tpu.vmem_limit(
    [
      ((bq, 256), jnp.bfloat16),
      ((bk, 256), jnp.bfloat16),
      ((bk, 128), jnp.bfloat16),
      ((bq, 4), jnp.int32),
      ((bq, 128), jnp.bfloat16),
      ((bq, 128), jnp.float32),
    ],
    [((bq, 128), jnp.float32)] * 3,
    bq,
    bk,
    capacity=128 * MIB,
  )
  assert neo(128, 128) == pallas_tpu.VMEM_LIMIT_FLOOR  # small blocks: the default limit
  assert neo(1024, 1024) > neo(512, 1024) > pallas_tpu.VMEM_LIMIT_FLOOR
  assert neo(1024, 1024) % MIB == 0
  # 6 [1024, 1024] float32 temporaries alone are 24 MiB
  assert neo(1024, 1024) >= 1.5 * 6 * 4 * MIB
  with pytest.raises(UserError, match="VMEM"):
    pallas_tpu.vmem_limit([((4096, 256), jnp.float32)], [], 4096, 4096, capacity=64 * MIB)


def _tpu_module(b, length, sizes):
  seg, img, branch = random_batch(
    np.random.default_rng(4), b, length, image_len=(100, 400), text_len=(10, 100)
  )
  ids = ids_from_arrays(seg, img, branch)
  q = jax.ShapeDtypeStruct((b, length, 4, 256), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, length, 2, 256), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((b, length, 2, 128), jnp.bfloat16)
  fwd = lambda q, k, v: pallas_tpu.flash_attention(
    q, k, v, ids, scale=128**-0.5, block_sizes=sizes, interpret=False
  )
  bwd = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  jaxpr = jax.make_jaxpr(bwd)(q, k, v)
  text = jax.export.export(jax.jit(bwd), platforms=["tpu"])(q, k, v).mlir_module()
  return jaxpr, text


def _pallas_grids(jaxpr):
  grids = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      grids.append(eqn.params["grid_mapping"].grid)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          grids += _pallas_grids(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          grids += _pallas_grids(sub)
  return grids


def test_compressed_grid_lowers_for_tpu():
  # Mosaic lowering (jax.export, platforms=["tpu"]) of forward, dq and dk/dv at NEO's widths in
  # bf16: 2 rows (one call per row inside a loop), L = 1100 with the default blocks (512 x 512);
  # every grid has a dynamic (data-dependent) step axis; VMEM limits at the floor
  jaxpr, text = _tpu_module(2, 1100, None)
  assert text.count("tpu_custom_call") == 3
  grids = _pallas_grids(jaxpr.jaxpr)
  assert len(grids) == 3
  for grid in grids:
    assert not isinstance(grid[1], int), grid  # the step axis is not a static size
  limits = [int(x) for x in re.findall(r"\\22size\\22: (\d+)", text)]
  assert limits == [pallas_tpu.VMEM_LIMIT_FLOOR] * 3, limits


def test_large_blocks_raise_the_vmem_limit_in_the_tpu_module():
  _, text = _tpu_module(1, 2048, pallas_tpu.BlockSizes(1024, 1024))
  limits = [int(x) for x in re.findall(r"\\22size\\22: (\d+)", text)]
  assert len(limits) == 3
  assert all(pallas_tpu.VMEM_LIMIT_FLOOR < x <= pallas_tpu.VMEM_CAPACITY_UNKNOWN for x in limits), (
    limits
  )
