"""Block-skipping flash attention in plain XLA: the CPU implementation of `attention`.

The Pallas kernels' algorithm written with XLA loops, so it compiles for any backend and is
what XLA:CPU runs best: queries in blocks of `block` rows, and for each query block only the
key blocks the rule allows (the hull of `masks.block_ranges`' visit intervals over the batch;
a causal row visits about half of them). An online softmax keeps no [Lq, Lk] array; the
backward pass (a custom VJP) recomputes each visited block's probabilities from the saved
log-sum-exp and accumulates dQ per query block and dK, dV per key block in place. The mask
inside a block comes from the per-query key intervals (`masks.kv_ranges`), never from ids.

Layouts: q/k/v are moved once to head-major [B, Hkv, L, (G,) D] so every block is a
contiguous slice and each matmul is one batched GEMM over (B, Hkv) with G * block rows.
Numerics are the reference's (float32 scores and softmax, probabilities cast to the value
dtype before the value product) up to the order of the sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from neo_jax.ops import flash_common as fc
from neo_jax.ops import masks
from neo_jax.ops.masks import AttnIds

# fwd+bwd of one layer at L = 2048 (8 / 4 heads, widths 128 / 64, 2 shared CPU cores) in CPU
# seconds: 0.40 at block 64, 0.42 at 32, 0.46-0.47 at 128 and 256. XLA:CPU runs the batched
# block matmuls on one thread at 60-100 GFLOP/s whatever the block; 64 skips more of the mask.
DEFAULT_BLOCK = 64


def _block_mask(ranges_bq4: jax.Array, kv_start: jax.Array, block_kv: int) -> jax.Array:
  """bool [B, bq, bk]: which keys of the block [kv_start, kv_start + bk) each query sees."""
  k = kv_start + jnp.arange(block_kv, dtype=jnp.int32)
  r = ranges_bq4[:, :, None, :]
  return ((k >= r[..., masks.RANGE_LO1]) & (k < r[..., masks.RANGE_HI1])) | (
    (k >= r[..., masks.RANGE_LO2]) & (k < r[..., masks.RANGE_HI2])
  )


def _visit_bounds(q_blocks: jax.Array, num_kv_blocks: int) -> tuple[jax.Array, jax.Array]:
  """int32 [nq] first and last+1 key block any row of the batch visits from each query block."""
  lo1, hi1 = q_blocks[..., masks.QB_VISIT1_LO], q_blocks[..., masks.QB_VISIT1_HI]
  lo2, hi2 = q_blocks[..., masks.QB_VISIT2_LO], q_blocks[..., masks.QB_VISIT2_HI]
  lo = jnp.minimum(
    jnp.where(hi1 > lo1, lo1, num_kv_blocks), jnp.where(hi2 > lo2, lo2, num_kv_blocks)
  )
  hi = jnp.maximum(jnp.where(hi1 > lo1, hi1, 0), jnp.where(hi2 > lo2, hi2, 0))
  lo, hi = lo.min(axis=0), hi.max(axis=0)
  return jnp.minimum(lo, hi), hi


def _rows(x_bqd: jax.Array) -> jax.Array:
  """[B, Hkv, bq, G, D] -> [B, Hkv, bq * G, D] (rows ordered query-major)."""
  b, h, bq, g, d = x_bqd.shape
  return x_bqd.reshape(b, h, bq * g, d)


def _row_mask(mask_bqk: jax.Array, group: int) -> jax.Array:
  """[B, bq, bk] -> [B, 1, bq * G, bk], broadcast over kv heads and the query group."""
  b, bq, bk = mask_bqk.shape
  return jnp.broadcast_to(mask_bqk[:, None, :, None, :], (b, 1, bq, group, bk)).reshape(
    b, 1, bq * group, bk
  )


def _block_scores(q_i, kh, vh, r_i, j, block: int, scale: float):
  """Masked scores [B, Hkv, rows, bk] of a query block against key block j, and k_j, v_j."""
  k_j = jax.lax.dynamic_slice_in_dim(kh, j * block, block, axis=2)
  v_j = jax.lax.dynamic_slice_in_dim(vh, j * block, block, axis=2)
  s = jnp.einsum("bhrd,bhkd->bhrk", q_i, k_j, preferred_element_type=jnp.float32) * scale
  group = q_i.shape[2] // r_i.shape[1]
  s = jnp.where(_row_mask(_block_mask(r_i, j * block, block), group), s, fc.MASK_VALUE)
  return s, k_j, v_j


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(qh, kh, vh, ranges, q_blocks, scale, block):
  return _flash_fwd(qh, kh, vh, ranges, q_blocks, scale, block)[0]


def _flash_fwd(qh, kh, vh, ranges, q_blocks, scale, block):
  """qh [B, Hkv, Lp, G, Dqk], kh [B, Hkv, Lp, Dqk], vh [B, Hkv, Lp, Dv] -> out like qh (Dv)."""
  b, hkv, lp, g, _ = qh.shape
  nq = lp // block
  lo, hi = _visit_bounds(q_blocks, nq)

  def q_block(i):
    q_i = _rows(jax.lax.dynamic_slice_in_dim(qh, i * block, block, axis=2))
    r_i = jax.lax.dynamic_slice_in_dim(ranges, i * block, block, axis=1)
    rows = q_i.shape[2]

    def kv_block(j, carry):
      m, l, acc = carry
      s, _, v_j = _block_scores(q_i, kh, vh, r_i, j, block, scale)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum(
        "bhrk,bhkd->bhrd", p.astype(vh.dtype), v_j, preferred_element_type=jnp.float32
      )
      return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + pv

    init = (
      jnp.full((b, hkv, rows), fc.M_INIT, jnp.float32),
      jnp.zeros((b, hkv, rows), jnp.float32),
      jnp.zeros((b, hkv, rows, vh.shape[-1]), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(lo[i], hi[i], kv_block, init)
    seen = l > 0  # rows with no allowed key (padding) give 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out.astype(vh.dtype), lse

  out, lse = jax.lax.map(q_block, jnp.arange(nq, dtype=jnp.int32))  # [nq, B, Hkv, rows, .]
  out = jnp.moveaxis(out, 0, 2).reshape(b, hkv, lp, g, vh.shape[-1])
  lse = jnp.moveaxis(lse, 0, 2).reshape(b, hkv, lp * g)
  out, lse = fc.name_saved(out, lse)
  return out, (qh, kh, vh, ranges, q_blocks, out, lse)


def _flash_bwd(scale, block, residuals, d_out):
  qh, kh, vh, ranges, q_blocks, out, lse = residuals
  b, hkv, lp, g, dqk = qh.shape
  nq = lp // block
  lo, hi = _visit_bounds(q_blocks, nq)
  delta = jnp.einsum(
    "bhlgd,bhlgd->bhlg", d_out.astype(jnp.float32), out.astype(jnp.float32)
  ).reshape(b, hkv, lp * g)

  def q_block(i, carry):
    dk, dv = carry
    rows = block * g
    q_i = _rows(jax.lax.dynamic_slice_in_dim(qh, i * block, block, axis=2))
    do_i = _rows(jax.lax.dynamic_slice_in_dim(d_out, i * block, block, axis=2))
    r_i = jax.lax.dynamic_slice_in_dim(ranges, i * block, block, axis=1)
    lse_i = jax.lax.dynamic_slice_in_dim(lse, i * rows, rows, axis=2)
    delta_i = jax.lax.dynamic_slice_in_dim(delta, i * rows, rows, axis=2)

    def kv_block(j, carry):
      dq_i, dk, dv = carry
      s, k_j, v_j = _block_scores(q_i, kh, vh, r_i, j, block, scale)
      p = jnp.exp(s - lse_i[..., None])
      dp = jnp.einsum("bhrd,bhkd->bhrk", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i[..., None]) * scale).astype(qh.dtype)
      dq_i = dq_i + jnp.einsum("bhrk,bhkd->bhrd", ds, k_j, preferred_element_type=jnp.float32)
      dk_j = jnp.einsum("bhrk,bhrd->bhkd", ds, q_i, preferred_element_type=jnp.float32)
      dv_j = jnp.einsum(
        "bhrk,bhrd->bhkd", p.astype(vh.dtype), do_i, preferred_element_type=jnp.float32
      )
      add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
        acc, jax.lax.dynamic_slice_in_dim(acc, j * block, block, axis=2) + x, j * block, axis=2
      )
      return dq_i, add(dk, dk_j), add(dv, dv_j)

    dq_i = jnp.zeros((b, hkv, rows, dqk), jnp.float32)
    dq_i, dk, dv = jax.lax.fori_loop(lo[i], hi[i], kv_block, (dq_i, dk, dv))
    return (dk, dv), dq_i

  init = (jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32))
  (dk, dv), dq = jax.lax.scan(lambda c, i: q_block(i, c), init, jnp.arange(nq, dtype=jnp.int32))
  dq = jnp.moveaxis(dq, 0, 2).reshape(qh.shape)
  return (dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  ids: AttnIds,
  *,
  scale: float,
  block: int = DEFAULT_BLOCK,
) -> jax.Array:
  """Self-attention of one packed row set: q [B, L, Hq, Dqk], k [B, L, Hkv, Dqk],
  v [B, L, Hkv, Dv] -> [B, L, Hq, Dv]. `block` rows per query and key block (a power of
  two, at most the padded row)."""
  block = fc.fit_block(block, q.shape[1], 8)
  lay = fc.layout_of(q, k, v, block)
  tables = fc.tables_for(ids, lay.padded, block, block)
  pad = lambda x: fc.pad_length(x, lay.padded)
  qh = pad(q).reshape(lay.batch, lay.padded, lay.num_kv_heads, lay.group, lay.head_dim_qk)
  qh = qh.transpose(0, 2, 1, 3, 4)
  kh, vh = pad(k).transpose(0, 2, 1, 3), pad(v).transpose(0, 2, 1, 3)
  out = _flash(qh, kh, vh, tables.ranges, tables.q_blocks, float(scale), block)
  out = out.transpose(0, 2, 1, 3, 4).reshape(lay.batch, lay.padded, lay.num_q_heads, lay.head_dim_v)
  return out[:, : lay.length]
