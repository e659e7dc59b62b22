"""Pallas GPU (Triton lowering) flash attention for the NEO rule, with block skipping.

One program per (q block, batch, head) walks only the kv blocks its queries can see: the
visited block ranges come from `masks.block_ranges` (at most two ranges per q block: the
shared prompt and the query's own span), so a packed row costs what its samples cost, not
L^2. Blocks allowed for every query skip the mask (`lax.cond`); partial blocks build it from
the per-query key intervals of `masks.kv_ranges`.

  forward  grid (nq, B, Hq): online softmax in base 2, fp32 accumulators, writes out and lse
  dq       grid (nq, B, Hq): same walk, recomputes p from lse
  dk, dv   grid (nk, B, Hkv): per kv block, loops over the G query heads of its group (GQA)
           and the query blocks [q_lo, q_hi) that visit it

Dots take bf16 (or the input dtype) and accumulate in fp32. Widths: q/k Dqk, v Dv may differ
(NEO: 256 / 128); on GPUs both are zero-padded to powers of two (Triton tiles). Default blocks
suit Dqk = 256 on H100 (fwd 128 x 64, bwd 64 x 64, 8 warps). On non-GPU backends the same
kernels run in interpret mode, which is how they are tested on CPU.

Pallas selects Triton through `compiler_params`. The Triton backend is deprecated from jax
0.11 on; the kernel body uses only generic Pallas (refs, dots, loops, conds) so that a Mosaic
GPU port changes the call site, not the algorithm.

Why our own kernel rather than tokamax's Hopper flash attention with `k_start`/`k_end`: that
mask holds one key interval per query (rejected-branch queries need two), it is reached only
through tokamax's private `base.Mask`, the version installable next to jax 0.10 (0.0.12)
differs from the ones for jax 0.11+, and tokamax kernels have no CPU interpret mode, so
nothing here could test it. It is the first candidate to benchmark against on an H100.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from neo_jax.ops import flash_common as fc
from neo_jax.ops import masks
from neo_jax.ops.masks import AttnIds

try:  # Triton compiler params: present in jax 0.10 - 0.12, deprecated from 0.11
  from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover
  pl_triton = None

LOG2E = math.log2(math.e)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 128
  block_kv: int = 64
  block_q_bwd: int = 64
  block_kv_bwd: int = 64
  num_warps: int = 8
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int
  layout: fc.Layout
  interpret: bool
  num_warps: int
  num_stages: int

  def compiler_params(self):
    if self.interpret or pl_triton is None:
      return None
    return pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _precision(dtype) -> Optional[jax.lax.Precision]:
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, dims):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32,
                             precision=_precision(a.dtype))


def _in_ranges(k_pos, r0, r1, r2, r3):
  return ((k_pos >= r0) & (k_pos < r1)) | ((k_pos >= r2) & (k_pos < r3))


def _q_table(qt_ref, base):
  """(visit1_lo, n1, visit2_lo, n2, full(j)) of one q block from its 8 table entries."""
  t = [qt_ref[base + c] for c in range(masks.QB_FIELDS)]
  s1, e1 = t[masks.QB_VISIT1_LO], t[masks.QB_VISIT1_HI]
  s2, e2 = t[masks.QB_VISIT2_LO], t[masks.QB_VISIT2_HI]

  def full(j):
    return (((j >= t[masks.QB_FULL1_LO]) & (j < t[masks.QB_FULL1_HI]))
            | ((j >= t[masks.QB_FULL2_LO]) & (j < t[masks.QB_FULL2_HI])))

  return s1, jnp.maximum(e1 - s1, 0), s2, jnp.maximum(e2 - s2, 0), full


def _walk_kv_blocks(qt_ref, step, carry):
  """Runs step(j, full, carry) over the visited kv blocks of this q block."""
  s1, n1, s2, n2, full = _q_table(qt_ref, 0)

  def body(t, carry):
    j = jnp.where(t < n1, s1 + t, s2 + (t - n1))
    return step(j, full(j), carry)

  return jax.lax.fori_loop(0, n1 + n2, body, carry)


def _mask_unless(full, allowed_fn, s):
  """s with -inf outside the allowed keys; blocks allowed throughout skip the compares. Only
  this select sits under the branch, so loads and dots stay in the loop body (pipelining)."""
  return jax.lax.cond(full, lambda s: s, lambda s: jnp.where(allowed_fn(), s, fc.MASK_VALUE), s)


# --- forward ------------------------------------------------------------------------------------

def _fwd_kernel(qt_ref, q_ref, k_ref, v_ref, rng_ref, o_ref, lse_ref, *, cfg: _Config):
  bq, bk = cfg.block_q, cfg.block_kv
  q = q_ref[...]
  r = [rng_ref[c, :][:, None] for c in range(4)]  # [bq, 1] each
  qk_scale = cfg.scale * LOG2E

  def step(j, full, carry):
    acc, m, l = carry
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = _dot(q, k, NT) * qk_scale  # [bq, bk], base-2 logits
    s = _mask_unless(full, lambda: _in_ranges(start + jnp.arange(bk, dtype=jnp.int32)[None, :],
                                              *r), s)
    m_next = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_next)
    p = jnp.exp2(s - m_next[:, None])  # exactly 0 where masked
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, NN)
    return acc, m_next, alpha * l + p.sum(axis=1)

  init = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
          jnp.full((bq,), fc.M_INIT, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = _walk_kv_blocks(qt_ref, step, init)
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), 0.0)


def _forward(q, k, v, tables: fc.Tables, cfg: _Config):
  lay = cfg.layout
  bq, g = cfg.block_q, lay.group
  b, lp, hq = lay.batch, lay.padded, lay.num_q_heads
  dqk, dv = q.shape[-1], v.shape[-1]
  nq = lp // bq
  kv_map = lambda i, bi, h: (bi, 0, jax.lax.div(h, g), 0)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(nq, b, hq),
      in_specs=[
          pl.BlockSpec((None, None, masks.QB_FIELDS), lambda i, bi, h: (bi, i, 0)),
          pl.BlockSpec((None, bq, None, dqk), lambda i, bi, h: (bi, i, h, 0)),
          pl.BlockSpec((None, lp, None, dqk), kv_map),
          pl.BlockSpec((None, lp, None, dv), kv_map),
          pl.BlockSpec((None, 4, bq), lambda i, bi, h: (bi, 0, i)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, dv), lambda i, bi, h: (bi, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, lp, hq, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, lp), jnp.float32)],
      compiler_params=cfg.compiler_params(),
      interpret=cfg.interpret,
      name="neo_flash_fwd_gpu",
  )(tables.q_blocks, q, k, v, jnp.swapaxes(tables.ranges, 1, 2))
  return out, lse


# --- backward: dq -------------------------------------------------------------------------------

def _dq_kernel(qt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, rng_ref, dq_ref, *,
               cfg: _Config):
  bk = cfg.block_kv_bwd
  q, do = q_ref[...], do_ref[...]
  lse, di = lse_ref[...][:, None], di_ref[...][:, None]
  r = [rng_ref[c, :][:, None] for c in range(4)]
  qk_scale = cfg.scale * LOG2E

  def step(j, full, dq):
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = _dot(q, k, NT) * qk_scale
    s = _mask_unless(full, lambda: _in_ranges(start + jnp.arange(bk, dtype=jnp.int32)[None, :],
                                              *r), s)
    p = jnp.exp2(s - lse)
    ds = p * (_dot(do, v, NT) - di)
    return dq + _dot(ds.astype(k.dtype), k, NN)

  dq = _walk_kv_blocks(qt_ref, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dq(q, k, v, do, lse, di, tables: fc.Tables, cfg: _Config):
  lay = cfg.layout
  bq, g = cfg.block_q_bwd, lay.group
  b, lp, hq = lay.batch, lay.padded, lay.num_q_heads
  dqk, dv = q.shape[-1], v.shape[-1]
  q_map = lambda i, bi, h: (bi, i, h, 0)
  kv_map = lambda i, bi, h: (bi, 0, jax.lax.div(h, g), 0)
  row_map = lambda i, bi, h: (bi, h, i)
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(lp // bq, b, hq),
      in_specs=[
          pl.BlockSpec((None, None, masks.QB_FIELDS), lambda i, bi, h: (bi, i, 0)),
          pl.BlockSpec((None, bq, None, dqk), q_map),
          pl.BlockSpec((None, lp, None, dqk), kv_map),
          pl.BlockSpec((None, lp, None, dv), kv_map),
          pl.BlockSpec((None, bq, None, dv), q_map),
          pl.BlockSpec((None, None, bq), row_map),
          pl.BlockSpec((None, None, bq), row_map),
          pl.BlockSpec((None, 4, bq), lambda i, bi, h: (bi, 0, i)),
      ],
      out_specs=pl.BlockSpec((None, bq, None, dqk), q_map),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=cfg.compiler_params(),
      interpret=cfg.interpret,
      name="neo_flash_dq_gpu",
  )(tables.q_blocks, q, k, v, do, lse, di, jnp.swapaxes(tables.ranges, 1, 2))


# --- backward: dk, dv ---------------------------------------------------------------------------

def _dkv_kernel(qt_ref, kvt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, rng_ref,
                dk_ref, dv_ref, *, cfg: _Config):
  bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
  group = cfg.layout.group
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[:, None]  # [bk, 1]
  qk_scale = cfg.scale * LOG2E
  q_lo, q_hi = kvt_ref[0], kvt_ref[1]
  n = jnp.maximum(q_hi - q_lo, 0)

  def step(g, i, full, carry):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    q, do = q_ref[rows, g, :], do_ref[rows, g, :]
    lse, di = lse_ref[g, rows][None, :], di_ref[g, rows][None, :]
    s_t = _dot(k, q, NT) * qk_scale  # [bk, bq]
    s_t = _mask_unless(full, lambda: _in_ranges(k_pos, *[rng_ref[c, rows][None, :]
                                                         for c in range(4)]), s_t)
    p_t = jnp.exp2(s_t - lse)
    dv = dv + _dot(p_t.astype(do.dtype), do, NN)
    ds_t = p_t * (_dot(v, do, NT) - di)
    return dk + _dot(ds_t.astype(q.dtype), q, NN), dv

  def body(t, carry):
    g, i = jax.lax.div(t, n), q_lo + jax.lax.rem(t, n)
    full = _q_table(qt_ref, i * masks.QB_FIELDS)[4]
    # A query block inside the hull [q_lo, q_hi) that does not visit this kv block (rare:
    # ~0.2% of the hull on random packed rows) is computed fully masked and adds exactly
    # zero; no branch around the loads and dots keeps the loop pipelinable.
    return step(g, i, full(j), carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = jax.lax.fori_loop(0, group * n, body, init)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv(q, k, v, do, lse, di, tables: fc.Tables, cfg: _Config):
  lay = cfg.layout
  bk, g = cfg.block_kv_bwd, lay.group
  b, lp, hkv = lay.batch, lay.padded, lay.num_kv_heads
  dqk, dv = q.shape[-1], v.shape[-1]
  nq = tables.q_blocks.shape[1]
  group_map = lambda j, bi, h: (bi, 0, h, 0, 0)
  kv_map = lambda j, bi, h: (bi, j, h, 0)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(lp // bk, b, hkv),
      in_specs=[
          pl.BlockSpec((None, nq * masks.QB_FIELDS), lambda j, bi, h: (bi, 0)),
          pl.BlockSpec((None, None, 2), lambda j, bi, h: (bi, j, 0)),
          pl.BlockSpec((None, lp, None, g, dqk), group_map),
          pl.BlockSpec((None, bk, None, dqk), kv_map),
          pl.BlockSpec((None, bk, None, dv), kv_map),
          pl.BlockSpec((None, lp, None, g, dv), group_map),
          pl.BlockSpec((None, None, g, lp), lambda j, bi, h: (bi, h, 0, 0)),
          pl.BlockSpec((None, None, g, lp), lambda j, bi, h: (bi, h, 0, 0)),
          pl.BlockSpec((None, 4, lp), lambda j, bi, h: (bi, 0, 0)),
      ],
      out_specs=[pl.BlockSpec((None, bk, None, dqk), kv_map),
                 pl.BlockSpec((None, bk, None, dv), kv_map)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=cfg.compiler_params(),
      interpret=cfg.interpret,
      name="neo_flash_dkv_gpu",
  )(tables.q_blocks.reshape(b, -1), tables.kv_blocks,
    q.reshape(b, lp, hkv, g, dqk), k, v, do.reshape(b, lp, hkv, g, dv),
    lse.reshape(b, hkv, g, lp), di.reshape(b, hkv, g, lp), jnp.swapaxes(tables.ranges, 1, 2))


# --- custom_vjp ---------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, tables, tables_bwd, cfg):
  return _forward(q, k, v, tables, cfg)[0]


def _flash_fwd(q, k, v, tables, tables_bwd, cfg):
  out, lse = _forward(q, k, v, tables, cfg)
  return out, (q, k, v, out, lse, tables, tables_bwd)


def _flash_bwd(cfg, res, d_out):
  q, k, v, out, lse, tables, tables_bwd = res
  do = d_out.astype(out.dtype)
  di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, Lp, Hq]
  di = jnp.swapaxes(di, 1, 2)  # [B, Hq, Lp]
  dq = _dq(q, k, v, do, lse, di, tables_bwd, cfg)
  dk, dv = _dkv(q, k, v, do, lse, di, tables_bwd, cfg)
  none = lambda t: jax.tree.map(lambda _: None, t)
  return dq, dk, dv, none(tables), none(tables_bwd)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, ids: AttnIds, *, scale: float,
                    block_sizes: Optional[BlockSizes] = None,
                    interpret: Optional[bool] = None) -> jax.Array:
  """Self-attention under the NEO rule. q [B, L, Hq, Dqk], k [B, L, Hkv, Dqk],
  v [B, L, Hkv, Dv] -> [B, L, Hq, Dv]; differentiable in q, k, v.

  `interpret`: None compiles on GPU and interprets elsewhere.
  """
  if ids.positions is not None:
    raise ValueError("pallas_gpu: explicit positions (cache slots) are not supported; use the "
                     "reference for cross-attention")
  if interpret is None:
    interpret = not fc.on_backend("gpu")
  sizes = block_sizes or BlockSizes()
  length = q.shape[1]
  minimum = 8 if interpret else 16
  bq, bk = (fc.fit_block(x, length, minimum) for x in (sizes.block_q, sizes.block_kv))
  bq_b, bk_b = (fc.fit_block(x, length, minimum) for x in (sizes.block_q_bwd, sizes.block_kv_bwd))
  lay = fc.layout_of(q, k, v, max(bq, bk, bq_b, bk_b))
  if not interpret:  # Triton tiles are powers of two
    widths = lambda d: fc.next_pow2(max(d, 16))
    q, k = fc.pad_last(q, widths(lay.head_dim_qk)), fc.pad_last(k, widths(lay.head_dim_qk))
    v = fc.pad_last(v, widths(lay.head_dim_v))
  cfg = _Config(float(scale), bq, bk, bq_b, bk_b, lay, bool(interpret), sizes.num_warps,
                sizes.num_stages)
  lp = lay.padded
  tables = fc.tables_for(ids, lp, bq, bk)
  tables_bwd = tables if (bq_b, bk_b) == (bq, bk) else fc.tables_for(ids, lp, bq_b, bk_b)
  pad = lambda x: fc.pad_length(x, lp)
  out = _flash(pad(q), pad(k), pad(v), tables, tables_bwd, cfg)
  return out[:, :lay.length, :, :lay.head_dim_v]
