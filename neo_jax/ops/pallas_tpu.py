"""Pallas TPU flash attention for the NEO rule on a compressed, block-sparse grid.

Grid. For each packed row the exact (q block, kv block) pairs the rule needs
(`masks.exact_block_states`) become a list of steps, one int32 word each (`step_table`): the
two block indices, the block state (partial: masked in-kernel from the per-query key intervals
`masks.kv_ranges`; full: no mask) and whether the step opens / closes its output block. The
list is scalar-prefetched into SMEM, the index maps read the block indices from it (as splash
attention's data-dependent index maps do) and its length is the grid's dynamic bound, so a pair
the rule skips costs no grid step at all:

  forward  grid (Hq, steps)      steps sorted by q block; online softmax in VMEM scratch; out
                                 and logsumexp are written at the last step of each q block
  dq       grid (Hq, steps)      the same list; recomputes p from logsumexp, accumulates dq
  dk, dv   grid (Hkv, steps, G)  the transposed list (sorted by kv block); the G query heads of
                                 the group (GQA) accumulate into one dk/dv block

An output block that no pair reaches (padding) still gets one step, which only writes zeros:
steps = Hq * (visited pairs + q blocks that see nothing), and likewise for dk, dv.

Bounds. Each pallas_call handles one row of the per-device batch (`lax.map` over rows), so
SMEM holds one row's list: at most nq * nk words, checked against `SMEM_TABLE_BYTES`. The VMEM
limit is set from the block sizes (`vmem_limit`). Block sizes default per row length
(`DEFAULT_BLOCKS`).

Layout. Arrays stay in the model's [B, L, H, D] layout, seen as [B, L, H * D] so a (block, D)
tile of one head is a plain BlockSpec block (no transposes). Query/key width may differ from
value width (NEO: 256 and 128). Compiled for TPU, both widths are zero-padded to multiples of
128 lanes and blocks are multiples of 128 (`tpu_shapes`); on other backends the kernels run in
interpret mode, where `tpu_shapes=True` forces the same shapes so tests cover them on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from neo_jax.errors import UserError
from neo_jax.ops import flash_common as fc
from neo_jax.ops import masks
from neo_jax.ops.masks import AttnIds

LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key block sizes (tokens), shared by the forward, dq and dk/dv kernels; None
  takes the default for the row length (`default_block_sizes`)."""

  block_q: int | None = None
  block_kv: int | None = None


# Default blocks by row length: (longest L, blocks). Smaller blocks skip more of a packed row
# (fewer masked-out pairs inside visited blocks); larger ones pay the fixed cost of a grid step
# (~0.35 us) over more work. A model of both (steps x (0.35 us + block FLOPs / bf16 peak) on
# NEO-like rows, benchmarks/README.md) puts 512 x 512 to 1024 x 1024 within ~10% of each other
# on v5e and favours the larger on faster chips and longer rows; the table takes the middle,
# and 1024 x 1024 beyond 32k also keeps a row's step list small. Short rows take 256 so that
# padding to a block stays small. Multiples of 128 (lanes). A model, not a measurement: a
# block sweep on the device is what should set these.
DEFAULT_BLOCKS: tuple[tuple[int, BlockSizes], ...] = (
  (1024, BlockSizes(256, 256)),
  (8192, BlockSizes(512, 512)),
  (32768, BlockSizes(512, 1024)),
  (1 << 62, BlockSizes(1024, 1024)),
)

# One row's step list lives in SMEM (1 MiB per core on TPU v4 and later); a quarter of it
# leaves room for everything else Mosaic keeps there. 256 KiB = 65,536 steps, e.g. L = 32k in
# 128 x 128 blocks or L = 128k in 512 x 512 blocks.
SMEM_TABLE_BYTES = 256 * 1024
# VMEM per core when the chip is not known (lowering without a TPU): v5p's and v7x's 64 MiB.
VMEM_CAPACITY_UNKNOWN = 64 * MIB
# Below this the compiler's default scoped limit applies anyway (16 MiB on v4 / v5e).
VMEM_LIMIT_FLOOR = 16 * MIB
# [bq, bk] float32 temporaries a kernel body holds at once (scores, probabilities, their
# gradients, the mask), counted for every kernel.
TEMPORARIES = 6


def default_block_sizes(length: int) -> BlockSizes:
  """The `DEFAULT_BLOCKS` entry for a row of `length` tokens."""
  for longest, sizes in DEFAULT_BLOCKS:
    if length <= longest:
      return sizes
  return DEFAULT_BLOCKS[-1][1]


# --- step tables --------------------------------------------------------------------------------
#
# One int32 word per grid step: bits 0-11 the inner block (kv block of the forward / dq list,
# q block of the dk/dv list), bits 12-23 the outer block (whose output the step accumulates),
# bits 24-25 the block state (masks.BLOCK_*; BLOCK_SKIP only on the write-only step of an empty
# output block), bit 26 first step of its outer block, bit 27 last.

INDEX_BITS = 12
MAX_BLOCKS = 1 << INDEX_BITS
_OUTER_SHIFT, _STATE_SHIFT, _FIRST_BIT, _LAST_BIT = INDEX_BITS, 2 * INDEX_BITS, 26, 27


class Step(NamedTuple):
  outer: jax.Array
  inner: jax.Array
  state: jax.Array
  first: jax.Array  # bool
  last: jax.Array  # bool


def decode_step(word: jax.Array) -> Step:
  bits = lambda shift, width: jax.lax.shift_right_logical(word, shift) & ((1 << width) - 1)
  return Step(
    bits(_OUTER_SHIFT, INDEX_BITS),
    bits(0, INDEX_BITS),
    bits(_STATE_SHIFT, 2),
    bits(_FIRST_BIT, 1) == 1,
    bits(_LAST_BIT, 1) == 1,
  )


class StepTable(NamedTuple):
  words: jax.Array  # int32 [B, n_outer * n_inner], the first `counts[b]` valid
  counts: jax.Array  # int32 [B]: grid steps of row b (per head)


def step_table(states_boi: jax.Array) -> StepTable:
  """The compressed step list of block states [B, outer, inner] (`masks.BLOCK_*`): every
  visited pair in (outer, inner) order, plus one write-only step for an outer block with none.
  """
  b, n_out, n_in = states_boi.shape
  visit = states_boi != masks.BLOCK_SKIP
  empty = ~visit.any(axis=-1, keepdims=True)
  inner = jnp.arange(n_in, dtype=jnp.int32)
  keep = visit | (empty & (inner == 0))
  first = jnp.argmax(keep, axis=-1)[..., None]
  last = n_in - 1 - jnp.argmax(keep[..., ::-1], axis=-1)[..., None]
  outer = jnp.arange(n_out, dtype=jnp.int32)[:, None]
  words = (
    inner
    | (outer << _OUTER_SHIFT)
    | (states_boi.astype(jnp.int32) << _STATE_SHIFT)
    | ((inner == first).astype(jnp.int32) << _FIRST_BIT)
    | ((inner == last).astype(jnp.int32) << _LAST_BIT)
  )
  size = n_out * n_in
  keep, words = keep.reshape(b, size), words.reshape(b, size)
  slot = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, size)  # kept words move to the front
  table = jnp.zeros((b, size + 1), jnp.int32).at[jnp.arange(b)[:, None], slot].set(words)
  table = table[:, :size]
  # a write-only step fetches the inner block of the step before it: no new DMA
  index = jnp.arange(size, dtype=jnp.int32)
  real = (table >> _STATE_SHIFT) & 3 != masks.BLOCK_SKIP
  before = jnp.maximum(jax.lax.cummax(jnp.where(real, index, -1), axis=1), 0)
  prev_inner = jnp.take_along_axis(table, before, axis=1) & (MAX_BLOCKS - 1)
  table = jnp.where(real, table, (table & ~(MAX_BLOCKS - 1)) | prev_inner)
  return StepTable(table, keep.sum(axis=1, dtype=jnp.int32))


class Plan(NamedTuple):
  """Everything the kernels know about the mask of a row set."""

  ranges: jax.Array  # int32 [B, Lp, 4] per-query key intervals
  fwd: StepTable  # forward and dq: outer = q block, inner = kv block
  dkv: StepTable  # dk, dv: outer = kv block, inner = q block


def plan_for(ids: AttnIds, padded: int, block_q: int, block_kv: int) -> Plan:
  ranges = fc.padded_ranges(ids, padded)
  states = masks.exact_block_states(ranges, block_q, block_kv)
  return Plan(ranges, step_table(states), step_table(jnp.swapaxes(states, 1, 2)))


def check_table_bounds(padded: int, block_q: int, block_kv: int) -> None:
  """UserError if one row's step list cannot be indexed or does not fit `SMEM_TABLE_BYTES`."""
  nq, nk = padded // block_q, padded // block_kv
  table_bytes = 4 * nq * nk
  if max(nq, nk) > MAX_BLOCKS or table_bytes > SMEM_TABLE_BYTES:
    raise UserError(
      f"pallas_tpu: a row of {padded} tokens in {block_q} x {block_kv} blocks needs "
      f"{nq} x {nk} step words ({table_bytes // 1024} KiB of SMEM per row), over the "
      f"{SMEM_TABLE_BYTES // 1024} KiB / {MAX_BLOCKS} blocks per axis limit; use larger "
      "blocks (pallas_tpu.BlockSizes)"
    )


# --- VMEM limit ---------------------------------------------------------------------------------


def _tile_bytes(shape: tuple[int, ...], dtype) -> int:
  """Bytes of a VMEM buffer: last dim padded to 128 lanes, the one before to whole sublane
  tiles (8 rows of 32 bits)."""
  itemsize = jnp.dtype(dtype).itemsize
  *lead, rows, cols = shape
  sublanes = 8 * max(1, 4 // itemsize)
  return math.prod(lead) * fc.round_up(rows, sublanes) * fc.round_up(cols, LANES) * itemsize


def vmem_capacity() -> int:
  """VMEM bytes per core of the TPU in use, or `VMEM_CAPACITY_UNKNOWN`."""
  if fc.on_backend("tpu"):
    try:
      return int(pltpu.get_tpu_info().vmem_capacity_bytes)
    except (ValueError, AttributeError):  # a chip this jax does not describe
      pass
  return VMEM_CAPACITY_UNKNOWN


def vmem_limit(
  blocks: list[tuple[tuple[int, ...], Any]],
  scratch: list[tuple[tuple[int, ...], Any]],
  block_q: int,
  block_kv: int,
  capacity: int | None = None,
) -> int:
  """`vmem_limit_bytes` for one kernel: its pipelined blocks twice (double buffering), its
  scratch once and `TEMPORARIES` [bq, bk] float32 arrays, plus half again for Mosaic's own
  scratch and relayouts; at least `VMEM_LIMIT_FLOOR`, at most the chip's VMEM."""
  capacity = capacity or vmem_capacity()
  need = (
    2 * sum(_tile_bytes(s, d) for s, d in blocks)
    + sum(_tile_bytes(s, d) for s, d in scratch)
    + TEMPORARIES * _tile_bytes((block_q, block_kv), jnp.float32)
  )
  if need > capacity:
    raise UserError(
      f"pallas_tpu: {block_q} x {block_kv} blocks need ~{need / MIB:.0f} MiB of "
      f"VMEM, over the {capacity // MIB} MiB of this TPU; use smaller blocks"
    )
  return min(capacity, max(VMEM_LIMIT_FLOOR, fc.round_up(need + need // 2, MIB)))


# --- kernels ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  block_q: int
  block_kv: int
  layout: fc.Layout
  interpret: Any  # False, True or pltpu.InterpretParams


def _dot(a, b, dims):
  return jax.lax.dot_general(
    a, b, dims, preferred_element_type=jnp.float32, precision=fc.matmul_precision(a.dtype)
  )


def _in_ranges(k_pos, r0, r1, r2, r3):
  return ((k_pos >= r0) & (k_pos < r1)) | ((k_pos >= r2) & (k_pos < r3))


def _compute(step: Step, body) -> None:
  """body(masked) on the step's block: without the mask where it is allowed throughout."""
  pl.when(step.state == masks.BLOCK_FULL)(lambda: body(False))
  pl.when(step.state == masks.BLOCK_PARTIAL)(lambda: body(True))


def _outer(steps_ref, s):
  return decode_step(steps_ref[s]).outer


def _inner(steps_ref, s):
  return decode_step(steps_ref[s]).inner


def _block(spec: pl.BlockSpec) -> tuple[int, ...]:
  return tuple(d for d in spec.block_shape if d is not None)


def _call_rows(
  kernel,
  cfg: _Config,
  name: str,
  table: StepTable,
  grid,
  in_specs,
  out_specs,
  out_shape,
  scratch,
  semantics,
  *operands,
):
  """One pallas_call per row of the batch over that row's step list: `grid(steps)` with the
  row's step count as its dynamic axis, the row index and the list scalar-prefetched (the
  index maps see them after the grid indices), outputs of one row stacked over the batch."""
  vmem_blocks = [(_block(p), x.dtype) for p, x in zip(in_specs, operands)] + [
    (_block(p), o.dtype) for p, o in zip(out_specs, out_shape)
  ]
  limit = vmem_limit(vmem_blocks, scratch, cfg.block_q, cfg.block_kv)
  params = pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)

  def row_call(b):
    grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=grid(table.counts[b]),
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM(s, d) for s, d in scratch],
    )
    call = pl.pallas_call(
      functools.partial(kernel, cfg=cfg),
      grid_spec=grid_spec,
      out_shape=out_shape,
      compiler_params=params,
      interpret=cfg.interpret,
      name=name,
    )
    return call(b.reshape(1), table.words[b], *operands)

  if cfg.layout.batch == 1:
    return jax.tree.map(lambda x: x[None], row_call(jnp.int32(0)))
  return jax.lax.map(row_call, jnp.arange(cfg.layout.batch, dtype=jnp.int32))


def _widths(q, v, lay: fc.Layout) -> tuple[int, int]:
  return q.shape[-1] // lay.num_q_heads, v.shape[-1] // lay.num_kv_heads


# --- forward ------------------------------------------------------------------------------------


def _fwd_kernel(
  row_ref,
  steps_ref,
  q_ref,
  k_ref,
  v_ref,
  rng_ref,
  o_ref,
  lse_ref,
  m_scr,
  l_scr,
  acc_scr,
  *,
  cfg: _Config,
):
  del row_ref
  st = decode_step(steps_ref[pl.program_id(1)])

  @pl.when(st.first)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, fc.M_INIT, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def body(masked: bool):
    s = _dot(q_ref[...], k_ref[...], NT) * cfg.scale  # [bq, bk]
    if masked:
      k_pos = st.inner * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_kv), 1)
      r = rng_ref[...]
      allowed = _in_ranges(k_pos, r[:, 0:1], r[:, 1:2], r[:, 2:3], r[:, 3:4])
      s = jnp.where(allowed, s, fc.MASK_VALUE)
    m_prev = m_scr[...]  # [bq, LANES], lanes equal
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, 0:1])  # exactly 0 where masked
    m_scr[...] = m_next
    l_scr[...] = alpha * l_scr[...] + p.sum(axis=1, keepdims=True)
    v = v_ref[...]
    acc_scr[...] = alpha[:, 0:1] * acc_scr[...] + _dot(p.astype(v.dtype), v, NN)

  _compute(st, body)

  @pl.when(st.last)
  def _finish():
    l = l_scr[...]
    seen = l > 0.0  # padding queries see nothing: zero output
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = (acc_scr[...] * inv[:, 0:1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def _forward(q, k, v, plan: Plan, cfg: _Config):
  lay = cfg.layout
  bq, bk, g, lp, hq = cfg.block_q, cfg.block_kv, lay.group, lay.padded, lay.num_q_heads
  dqk, dv = _widths(q, v, lay)
  q_map = lambda h, s, row, st: (row[0], _outer(st, s), h)
  kv_map = lambda h, s, row, st: (row[0], _inner(st, s), jax.lax.div(h, g))
  in_specs = [
    pl.BlockSpec((None, bq, dqk), q_map),
    pl.BlockSpec((None, bk, dqk), kv_map),
    pl.BlockSpec((None, bk, dv), kv_map),
    pl.BlockSpec((None, bq, 4), lambda h, s, row, st: (row[0], _outer(st, s), 0)),
  ]
  out_specs = [
    pl.BlockSpec((bq, dv), lambda h, s, row, st: (_outer(st, s), h)),
    pl.BlockSpec((None, bq, LANES), lambda h, s, row, st: (h, _outer(st, s), 0)),
  ]
  out_shape = [
    jax.ShapeDtypeStruct((lp, hq * dv), q.dtype),
    jax.ShapeDtypeStruct((hq, lp, LANES), jnp.float32),
  ]
  scratch = [((bq, LANES), jnp.float32), ((bq, LANES), jnp.float32), ((bq, dv), jnp.float32)]
  out, lse = _call_rows(
    _fwd_kernel,
    cfg,
    "neo_flash_fwd",
    plan.fwd,
    lambda n: (hq, n),
    in_specs,
    out_specs,
    out_shape,
    scratch,
    ("parallel", "arbitrary"),
    q,
    k,
    v,
    plan.ranges,
  )
  return out, lse[..., 0]  # lse [B, Hq, Lp]


# --- backward: dq -------------------------------------------------------------------------------


def _dq_kernel(
  row_ref,
  steps_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  di_ref,
  rng_ref,
  dq_ref,
  dq_scr,
  *,
  cfg: _Config,
):
  del row_ref
  st = decode_step(steps_ref[pl.program_id(1)])

  @pl.when(st.first)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def body(masked: bool):
    k = k_ref[...]
    s = _dot(q_ref[...], k, NT) * cfg.scale  # [bq, bk]
    lse = jnp.expand_dims(lse_ref[0], -1)  # [bq, 1]
    di = jnp.expand_dims(di_ref[0], -1)
    if masked:
      k_pos = st.inner * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_kv), 1)
      r = rng_ref[...]
      allowed = _in_ranges(k_pos, r[:, 0:1], r[:, 1:2], r[:, 2:3], r[:, 3:4])
      s = jnp.where(allowed, s, fc.MASK_VALUE)
    p = jnp.exp(s - lse)
    dp = _dot(do_ref[...], v_ref[...], NT)  # [bq, bk]
    ds = p * (dp - di)
    dq_scr[...] += _dot(ds.astype(k.dtype), k, NN)

  _compute(st, body)

  @pl.when(st.last)
  def _finish():
    dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dq(q, k, v, do, lse_b1l, di_b1l, plan: Plan, cfg: _Config):
  lay = cfg.layout
  bq, bk, g, lp, hq = cfg.block_q, cfg.block_kv, lay.group, lay.padded, lay.num_q_heads
  dqk, dv = _widths(q, v, lay)
  q_map = lambda h, s, row, st: (row[0], _outer(st, s), h)
  kv_map = lambda h, s, row, st: (row[0], _inner(st, s), jax.lax.div(h, g))
  row_map = lambda h, s, row, st: (row[0], h, 0, _outer(st, s))
  in_specs = [
    pl.BlockSpec((None, bq, dqk), q_map),
    pl.BlockSpec((None, bk, dqk), kv_map),
    pl.BlockSpec((None, bk, dv), kv_map),
    pl.BlockSpec((None, bq, dv), q_map),
    pl.BlockSpec((None, None, 1, bq), row_map),
    pl.BlockSpec((None, None, 1, bq), row_map),
    pl.BlockSpec((None, bq, 4), lambda h, s, row, st: (row[0], _outer(st, s), 0)),
  ]
  out_specs = [pl.BlockSpec((bq, dqk), lambda h, s, row, st: (_outer(st, s), h))]
  out_shape = [jax.ShapeDtypeStruct((lp, q.shape[-1]), q.dtype)]
  (dq,) = _call_rows(
    _dq_kernel,
    cfg,
    "neo_flash_dq",
    plan.fwd,
    lambda n: (hq, n),
    in_specs,
    out_specs,
    out_shape,
    [((bq, dqk), jnp.float32)],
    ("parallel", "arbitrary"),
    q,
    k,
    v,
    do,
    lse_b1l,
    di_b1l,
    plan.ranges,
  )
  return dq


# --- backward: dk, dv ---------------------------------------------------------------------------


def _dkv_kernel(
  row_ref,
  steps_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  di_ref,
  rng_ref,
  dk_ref,
  dv_ref,
  dk_scr,
  dv_scr,
  *,
  cfg: _Config,
):
  del row_ref
  st = decode_step(steps_ref[pl.program_id(1)])  # outer: kv block, inner: q block
  g, ng = pl.program_id(2), pl.num_programs(2)

  @pl.when(st.first & (g == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def body(masked: bool):
    q, do = q_ref[...], do_ref[...]
    s_t = _dot(k_ref[...], q, NT) * cfg.scale  # [bk, bq]: keys on sublanes, queries on lanes
    if masked:
      k_pos = st.outer * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, (cfg.block_kv, 1), 0)
      r = rng_ref[...]  # [4, bq]
      s_t = jnp.where(_in_ranges(k_pos, r[0:1], r[1:2], r[2:3], r[3:4]), s_t, fc.MASK_VALUE)
    p_t = jnp.exp(s_t - lse_ref[...])  # lse row [1, bq]
    dv_scr[...] += _dot(p_t.astype(do.dtype), do, NN)
    dp_t = _dot(v_ref[...], do, NT)  # [bk, bq]
    ds_t = p_t * (dp_t - di_ref[...])
    dk_scr[...] += _dot(ds_t.astype(q.dtype), q, NN)

  _compute(st, body)

  @pl.when(st.last & (g == ng - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dkv(q, k, v, do, lse_b1l, di_b1l, plan: Plan, cfg: _Config):
  lay = cfg.layout
  bq, bk, g, lp, hkv = cfg.block_q, cfg.block_kv, lay.group, lay.padded, lay.num_kv_heads
  dqk, dv = _widths(q, v, lay)
  q_map = lambda h, s, gi, row, st: (row[0], _inner(st, s), h * g + gi)
  kv_map = lambda h, s, gi, row, st: (row[0], _outer(st, s), h)
  row_map = lambda h, s, gi, row, st: (row[0], h * g + gi, 0, _inner(st, s))
  out_map = lambda h, s, gi, row, st: (_outer(st, s), h)
  in_specs = [
    pl.BlockSpec((None, bq, dqk), q_map),
    pl.BlockSpec((None, bk, dqk), kv_map),
    pl.BlockSpec((None, bk, dv), kv_map),
    pl.BlockSpec((None, bq, dv), q_map),
    pl.BlockSpec((None, None, 1, bq), row_map),
    pl.BlockSpec((None, None, 1, bq), row_map),
    pl.BlockSpec((None, 4, bq), lambda h, s, gi, row, st: (row[0], 0, _inner(st, s))),
  ]
  out_specs = [pl.BlockSpec((bk, dqk), out_map), pl.BlockSpec((bk, dv), out_map)]
  out_shape = [
    jax.ShapeDtypeStruct((lp, k.shape[-1]), k.dtype),
    jax.ShapeDtypeStruct((lp, v.shape[-1]), v.dtype),
  ]
  scratch = [((bk, dqk), jnp.float32), ((bk, dv), jnp.float32)]
  ranges_t = jnp.swapaxes(plan.ranges, 1, 2)  # [B, 4, Lp]: queries on lanes
  return _call_rows(
    _dkv_kernel,
    cfg,
    "neo_flash_dkv",
    plan.dkv,
    lambda n: (hkv, n, g),
    in_specs,
    out_specs,
    out_shape,
    scratch,
    ("parallel", "arbitrary", "arbitrary"),
    q,
    k,
    v,
    do,
    lse_b1l,
    di_b1l,
    ranges_t,
  )


# --- custom_vjp ---------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, plan, cfg):
  return _forward(q, k, v, plan, cfg)[0]


def _flash_fwd(q, k, v, plan, cfg):
  out, lse = _forward(q, k, v, plan, cfg)
  out, lse = fc.name_saved(out, lse)
  return out, (q, k, v, out, lse, plan)


def _flash_bwd(cfg, res, d_out):
  q, k, v, out, lse, plan = res
  lay = cfg.layout
  b, lp, hq = lay.batch, lay.padded, lay.num_q_heads
  do = d_out.astype(out.dtype)
  di = jnp.sum(
    out.astype(jnp.float32).reshape(b, lp, hq, -1) * do.astype(jnp.float32).reshape(b, lp, hq, -1),
    axis=-1,
  )  # [B, Lp, Hq]
  di_b1l = jnp.swapaxes(di, 1, 2)[:, :, None, :]
  lse_b1l = lse[:, :, None, :]
  dq = _dq(q, k, v, do, lse_b1l, di_b1l, plan, cfg)
  dk, dv = _dkv(q, k, v, do, lse_b1l, di_b1l, plan, cfg)
  return dq, dk, dv, jax.tree.map(lambda t: None, plan)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  ids: AttnIds,
  *,
  scale: float,
  block_sizes: BlockSizes | None = None,
  interpret: Any = None,
  tpu_shapes: bool | None = None,
) -> jax.Array:
  """Self-attention under the NEO rule. q [B, L, Hq, Dqk], k [B, L, Hkv, Dqk],
  v [B, L, Hkv, Dv] -> [B, L, Hq, Dv]; differentiable in q, k, v.

  `block_sizes`: None (or None fields) take `default_block_sizes(L)`. `interpret`: None runs
  compiled on TPU and interpreted elsewhere; True or a `pltpu.InterpretParams` forces
  interpret mode.
  `tpu_shapes`: None follows compilation; True pads widths to 128 lanes and keeps blocks at
  128 or more in interpret mode too (the shapes Mosaic gets).
  """
  if ids.positions is not None:
    raise ValueError(
      "pallas_tpu: explicit positions (cache slots) are not supported; use the "
      "reference for cross-attention"
    )
  if interpret is None:
    interpret = not fc.on_backend("tpu")
  if tpu_shapes is None:
    tpu_shapes = interpret is False
  length = q.shape[1]
  sizes, default = block_sizes or BlockSizes(), default_block_sizes(length)
  minimum = LANES if tpu_shapes else 8
  bq = fc.fit_block(sizes.block_q or default.block_q, length, minimum)
  bk = fc.fit_block(sizes.block_kv or default.block_kv, length, minimum)
  if tpu_shapes and (bq % LANES or bk % LANES):
    raise UserError(f"pallas_tpu: blocks {bq} x {bk} are not multiples of {LANES}")
  lay = fc.layout_of(q, k, v, max(bq, bk))
  check_table_bounds(lay.padded, bq, bk)
  if tpu_shapes:  # Mosaic tiles: head widths on lanes
    q, k, v = fc.pad_last(q, LANES), fc.pad_last(k, LANES), fc.pad_last(v, LANES)
  dqk, dv = q.shape[-1], v.shape[-1]
  b, lp, hq, hkv = lay.batch, lay.padded, lay.num_q_heads, lay.num_kv_heads
  plan = plan_for(ids, lp, bq, bk)
  cfg = _Config(float(scale), bq, bk, lay, interpret)
  flat = lambda x, h, d: fc.pad_length(x, lp).reshape(b, lp, h * d)
  out = _flash(flat(q, hq, dqk), flat(k, hkv, dqk), flat(v, hkv, dv), plan, cfg)
  return out.reshape(b, lp, hq, dv)[:, : lay.length, :, : lay.head_dim_v]
