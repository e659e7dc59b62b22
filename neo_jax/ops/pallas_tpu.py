"""Pallas TPU flash attention for the NEO rule, with block skipping from key intervals.

Splash-style structure: the grid walks (batch, head, q block, kv block); the per-q-block kv
ranges (`masks.block_ranges`) are scalar-prefetched into SMEM, the K/V index maps clamp the kv
block into the visited ranges (a skipped step repeats the previous block index, so it issues
no DMA) and `pl.when` skips its compute. Inside a visited block the mask comes from the
per-query intervals (`masks.kv_ranges`), and blocks that are allowed throughout skip the mask.

  forward  grid (B, Hq, nq, nk): online softmax in VMEM scratch; writes out and logsumexp
  dq       grid (B, Hq, nq, nk): recomputes p from logsumexp, accumulates dq
  dk, dv   grid (B, Hkv, nk, G, nq): per kv block, the query blocks [q_lo, q_hi) of every query
           head of the group (GQA) accumulate into one dk/dv block

Arrays stay in the model's [B, L, H, D] layout, seen as [B, L, H * D] so a (block, D) tile of
one head is a plain BlockSpec block (no transposes). Query/key width may differ from value
width (NEO: 256 and 128). On real TPUs both widths are zero-padded to multiples of 128 and the
blocks are multiples of 128; on other backends the kernels run in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from neo_jax.ops import flash_common as fc
from neo_jax.ops import masks
from neo_jax.ops.masks import AttnIds

LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key block sizes (tokens), shared by the forward, dq and dk/dv kernels.

  Large blocks amortise the per-grid-step cost on TPU; small blocks skip more (on NEO-like
  16k rows, 512 x 512 blocks visit 18% of all blocks' area, 128 x 64 blocks 14%, the rule
  allows 13%: benchmarks/README.md). 512 is a starting point to tune on hardware.
  """

  block_q: int = 512
  block_kv: int = 512


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  block_q: int
  block_kv: int
  layout: fc.Layout
  interpret: Any  # False, True or pltpu.InterpretParams


def _precision(dtype) -> Optional[jax.lax.Precision]:
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, dims):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32,
                             precision=_precision(a.dtype))


def _table(ref, row, col):
  return ref[row * masks.QB_FIELDS + col]


def _visit_and_full(qt_ref, row, j):
  """Whether kv block j is visited by the q block of table row `row`, and unmasked there."""
  t = functools.partial(_table, qt_ref, row)
  within = lambda lo, hi: (j >= t(lo)) & (j < t(hi))
  visit = within(masks.QB_VISIT1_LO, masks.QB_VISIT1_HI) | within(masks.QB_VISIT2_LO,
                                                                  masks.QB_VISIT2_HI)
  full = within(masks.QB_FULL1_LO, masks.QB_FULL1_HI) | within(masks.QB_FULL2_LO,
                                                               masks.QB_FULL2_HI)
  return visit, full


def _kv_block_index(qt_ref, row, j):
  """kv block to fetch at step j: j itself when visited, else the nearest visited block, so
  consecutive skipped steps keep the same index (no DMA)."""
  t = functools.partial(_table, qt_ref, row)
  s1, e1 = t(masks.QB_VISIT1_LO), t(masks.QB_VISIT1_HI)
  s2, e2 = t(masks.QB_VISIT2_LO), t(masks.QB_VISIT2_HI)
  first = jnp.minimum(jnp.maximum(j, s1), jnp.maximum(e1 - 1, s1))
  second = jnp.minimum(jnp.maximum(j, s2), e2 - 1)
  return jnp.where(j >= s2, second, first)


def _q_block_index(kvt_ref, row, i):
  lo, hi = kvt_ref[2 * row], kvt_ref[2 * row + 1]
  return jnp.minimum(jnp.maximum(i, lo), jnp.maximum(hi - 1, lo))


def _in_ranges(k_pos, r0, r1, r2, r3):
  return ((k_pos >= r0) & (k_pos < r1)) | ((k_pos >= r2) & (k_pos < r3))


# --- forward ------------------------------------------------------------------------------------

def _fwd_kernel(qt_ref, q_ref, k_ref, v_ref, rng_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *,
                cfg: _Config):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  nq, nk = pl.num_programs(2), pl.num_programs(3)
  row = b * nq + i

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, fc.M_INIT, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(masked: bool):
    s = _dot(q_ref[...], k_ref[...], NT) * cfg.scale  # [bq, bk]
    if masked:
      k_pos = j * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_kv), 1)
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

  visit, full = _visit_and_full(qt_ref, row, j)
  pl.when(visit & full)(lambda: step(False))
  pl.when(visit & jnp.logical_not(full))(lambda: step(True))

  @pl.when(j == nk - 1)
  def _finish():
    l = l_scr[...]
    seen = l > 0.0  # padding queries see nothing: zero output
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = (acc_scr[...] * inv[:, 0:1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def _forward(q, k, v, tables: fc.Tables, cfg: _Config):
  lay = cfg.layout
  bq, bk, g = cfg.block_q, cfg.block_kv, lay.group
  b, lp = lay.batch, lay.padded
  nq, nk = lp // bq, lp // bk
  dqk, dv = q.shape[-1] // lay.num_q_heads, v.shape[-1] // lay.num_kv_heads

  def kv_map(bi, h, i, j, qt):
    return bi, _kv_block_index(qt, bi * nq + i, j), jax.lax.div(h, g)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, lay.num_q_heads, nq, nk),
      in_specs=[
          pl.BlockSpec((None, bq, dqk), lambda bi, h, i, j, qt: (bi, i, h)),
          pl.BlockSpec((None, bk, dqk), kv_map),
          pl.BlockSpec((None, bk, dv), kv_map),
          pl.BlockSpec((None, bq, 4), lambda bi, h, i, j, qt: (bi, i, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, dv), lambda bi, h, i, j, qt: (bi, i, h)),
          pl.BlockSpec((None, None, bq, LANES), lambda bi, h, i, j, qt: (bi, h, i, 0)),
      ],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, dv), jnp.float32)],
  )
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, lp, lay.num_q_heads * dv), q.dtype),
                 jax.ShapeDtypeStruct((b, lay.num_q_heads, lp, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="neo_flash_fwd",
  )(tables.q_blocks.reshape(-1), q, k, v, tables.ranges)
  return out, lse[..., 0]  # lse [B, Hq, Lp]


# --- backward: dq -------------------------------------------------------------------------------

def _dq_kernel(qt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, rng_ref, dq_ref, dq_scr, *,
               cfg: _Config):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  nq, nk = pl.num_programs(2), pl.num_programs(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def step(masked: bool):
    k = k_ref[...]
    s = _dot(q_ref[...], k, NT) * cfg.scale  # [bq, bk]
    lse = jnp.expand_dims(lse_ref[0], -1)  # [bq, 1]
    di = jnp.expand_dims(di_ref[0], -1)
    if masked:
      k_pos = j * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_kv), 1)
      r = rng_ref[...]
      allowed = _in_ranges(k_pos, r[:, 0:1], r[:, 1:2], r[:, 2:3], r[:, 3:4])
      s = jnp.where(allowed, s, fc.MASK_VALUE)
    p = jnp.exp(s - lse)
    dp = _dot(do_ref[...], v_ref[...], NT)  # [bq, bk]
    ds = p * (dp - di)
    dq_scr[...] += _dot(ds.astype(k.dtype), k, NN)

  visit, full = _visit_and_full(qt_ref, b * nq + i, j)
  pl.when(visit & full)(lambda: step(False))
  pl.when(visit & jnp.logical_not(full))(lambda: step(True))

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dq(q, k, v, do, lse_b1l, di_b1l, tables: fc.Tables, cfg: _Config):
  lay = cfg.layout
  bq, bk, g = cfg.block_q, cfg.block_kv, lay.group
  b, lp = lay.batch, lay.padded
  nq, nk = lp // bq, lp // bk
  dqk, dv = q.shape[-1] // lay.num_q_heads, v.shape[-1] // lay.num_kv_heads

  def kv_map(bi, h, i, j, qt):
    return bi, _kv_block_index(qt, bi * nq + i, j), jax.lax.div(h, g)

  q_map = lambda bi, h, i, j, qt: (bi, i, h)
  row_map = lambda bi, h, i, j, qt: (bi, h, 0, i)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, lay.num_q_heads, nq, nk),
      in_specs=[
          pl.BlockSpec((None, bq, dqk), q_map),
          pl.BlockSpec((None, bk, dqk), kv_map),
          pl.BlockSpec((None, bk, dv), kv_map),
          pl.BlockSpec((None, bq, dv), q_map),
          pl.BlockSpec((None, None, 1, bq), row_map),
          pl.BlockSpec((None, None, 1, bq), row_map),
          pl.BlockSpec((None, bq, 4), lambda bi, h, i, j, qt: (bi, i, 0)),
      ],
      out_specs=pl.BlockSpec((None, bq, dqk), q_map),
      scratch_shapes=[pltpu.VMEM((bq, dqk), jnp.float32)],
  )
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="neo_flash_dq",
  )(tables.q_blocks.reshape(-1), q, k, v, do, lse_b1l, di_b1l, tables.ranges)


# --- backward: dk, dv ---------------------------------------------------------------------------

def _dkv_kernel(qt_ref, kvt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, rng_ref,
                dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: _Config):
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  nk, ng, nq = pl.num_programs(2), pl.num_programs(3), pl.num_programs(4)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def step(masked: bool):
    q, do = q_ref[...], do_ref[...]
    s_t = _dot(k_ref[...], q, NT) * cfg.scale  # [bk, bq]: keys on sublanes, queries on lanes
    if masked:
      k_pos = j * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, (cfg.block_kv, 1), 0)
      r = rng_ref[...]  # [4, bq]
      s_t = jnp.where(_in_ranges(k_pos, r[0:1], r[1:2], r[2:3], r[3:4]), s_t, fc.MASK_VALUE)
    p_t = jnp.exp(s_t - lse_ref[...])  # lse row [1, bq]
    dv_scr[...] += _dot(p_t.astype(do.dtype), do, NN)
    dp_t = _dot(v_ref[...], do, NT)  # [bk, bq]
    ds_t = p_t * (dp_t - di_ref[...])
    dk_scr[...] += _dot(ds_t.astype(q.dtype), q, NN)

  lo, hi = kvt_ref[2 * (b * nk + j)], kvt_ref[2 * (b * nk + j) + 1]
  visit, full = _visit_and_full(qt_ref, b * nq + i, j)
  visit = visit & (i >= lo) & (i < hi)
  pl.when(visit & full)(lambda: step(False))
  pl.when(visit & jnp.logical_not(full))(lambda: step(True))

  @pl.when((g == ng - 1) & (i == nq - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dkv(q, k, v, do, lse_b1l, di_b1l, tables: fc.Tables, cfg: _Config):
  lay = cfg.layout
  bq, bk, g = cfg.block_q, cfg.block_kv, lay.group
  b, lp = lay.batch, lay.padded
  nq, nk = lp // bq, lp // bk
  dqk, dv = q.shape[-1] // lay.num_q_heads, v.shape[-1] // lay.num_kv_heads

  def q_map(bi, h, j, gi, i, qt, kvt):
    return bi, _q_block_index(kvt, bi * nk + j, i), h * g + gi

  def row_map(bi, h, j, gi, i, qt, kvt):
    return bi, h * g + gi, 0, _q_block_index(kvt, bi * nk + j, i)

  def ranges_map(bi, h, j, gi, i, qt, kvt):
    return bi, 0, _q_block_index(kvt, bi * nk + j, i)

  kv_map = lambda bi, h, j, gi, i, qt, kvt: (bi, j, h)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, lay.num_kv_heads, nk, g, nq),
      in_specs=[
          pl.BlockSpec((None, bq, dqk), q_map),
          pl.BlockSpec((None, bk, dqk), kv_map),
          pl.BlockSpec((None, bk, dv), kv_map),
          pl.BlockSpec((None, bq, dv), q_map),
          pl.BlockSpec((None, None, 1, bq), row_map),
          pl.BlockSpec((None, None, 1, bq), row_map),
          pl.BlockSpec((None, 4, bq), ranges_map),
      ],
      out_specs=[pl.BlockSpec((None, bk, dqk), kv_map), pl.BlockSpec((None, bk, dv), kv_map)],
      scratch_shapes=[pltpu.VMEM((bk, dqk), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
  )
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=cfg.interpret,
      name="neo_flash_dkv",
  )(tables.q_blocks.reshape(-1), tables.kv_blocks.reshape(-1), q, k, v, do, lse_b1l, di_b1l,
    jnp.swapaxes(tables.ranges, 1, 2))


# --- custom_vjp ---------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, tables, cfg):
  return _forward(q, k, v, tables, cfg)[0]


def _flash_fwd(q, k, v, tables, cfg):
  out, lse = _forward(q, k, v, tables, cfg)
  return out, (q, k, v, out, lse, tables)


def _flash_bwd(cfg, res, d_out):
  q, k, v, out, lse, tables = res
  lay = cfg.layout
  b, lp, hq = lay.batch, lay.padded, lay.num_q_heads
  do = d_out.astype(out.dtype)
  di = jnp.sum(out.astype(jnp.float32).reshape(b, lp, hq, -1)
               * do.astype(jnp.float32).reshape(b, lp, hq, -1), axis=-1)  # [B, Lp, Hq]
  di_b1l = jnp.swapaxes(di, 1, 2)[:, :, None, :]
  lse_b1l = lse[:, :, None, :]
  dq = _dq(q, k, v, do, lse_b1l, di_b1l, tables, cfg)
  dk, dv = _dkv(q, k, v, do, lse_b1l, di_b1l, tables, cfg)
  zeros = jax.tree.map(lambda t: None, tables)
  return dq, dk, dv, zeros


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, ids: AttnIds, *, scale: float,
                    block_sizes: Optional[BlockSizes] = None, interpret: Any = None) -> jax.Array:
  """Self-attention under the NEO rule. q [B, L, Hq, Dqk], k [B, L, Hkv, Dqk],
  v [B, L, Hkv, Dv] -> [B, L, Hq, Dv]; differentiable in q, k, v.

  `interpret`: None runs compiled on TPU and interpreted elsewhere; True or a
  `pltpu.InterpretParams` forces interpret mode.
  """
  if ids.positions is not None:
    raise ValueError("pallas_tpu: explicit positions (cache slots) are not supported; use the "
                     "reference for cross-attention")
  if interpret is None:
    interpret = not fc.on_backend("tpu")
  sizes = block_sizes or BlockSizes()
  length = q.shape[1]
  minimum = 8 if interpret else LANES
  bq = fc.fit_block(sizes.block_q, length, minimum)
  bk = fc.fit_block(sizes.block_kv, length, minimum)
  lay = fc.layout_of(q, k, v, max(bq, bk))
  if not interpret:  # Mosaic tiles: head widths on lanes
    q, k, v = fc.pad_last(q, LANES), fc.pad_last(k, LANES), fc.pad_last(v, LANES)
  dqk, dv = q.shape[-1], v.shape[-1]
  b, lp, hq, hkv = lay.batch, lay.padded, lay.num_q_heads, lay.num_kv_heads
  tables = fc.tables_for(ids, lp, bq, bk)
  cfg = _Config(float(scale), bq, bk, lay, interpret)
  flat = lambda x, h, d: fc.pad_length(x, lp).reshape(b, lp, h * d)
  out = _flash(flat(q, hq, dqk), flat(k, hkv, dqk), flat(v, hkv, dv), tables, cfg)
  out = out.reshape(b, lp, hq, dv)[:, :lay.length, :, :lay.head_dim_v]
  return out
