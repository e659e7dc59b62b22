"""Pallas GPU (Triton lowering) flash attention for the NEO rule, with block skipping.

One program per (q block, batch, head) walks only the kv blocks its queries can see: the
visited block ranges come from `masks.block_ranges` (at most two ranges per q block: the
shared prompt and the query's own span), so a packed row costs what its samples cost, not
L^2. Each program runs two loops (`masks.q_block_walks`): first over the blocks allowed for
every query (no mask), then over the partial ones (mask from the per-query key intervals of
`masks.kv_ranges`). Neither loop body branches, so Triton pipelines the k/v loads of both;
each step maps its counter to a block with a few scalar compares read from a table once.

  forward  grid (nq, B, Hq): online softmax in base 2 (the scale folded into the exp2's
           argument), fp32 accumulators, writes out and lse
  dq       grid (nq, B, Hq): same walk, recomputes p from lse
  dk, dv   grid (nk, B, Hkv): per kv block, for each of the G query heads of its group (GQA),
           the query blocks that see all of it, then the rest of the query-block hull that
           visits it (`masks.kv_block_walks`)

Dots take bf16 (or the input dtype) and accumulate in fp32. Widths: q/k Dqk, v Dv may differ
(NEO: 256 / 128); on GPUs both are zero-padded to powers of two (Triton tiles). Block sizes,
warps and stages come from a table per head width, fitted to the shared memory of the GPU's
compute capability (`block_sizes_for`, `smem_bytes`); forward and backward launch apart. On
non-GPU backends the same kernels run in interpret mode, which is how they are tested on CPU.

Triton, not Mosaic GPU. Pallas selects Triton through `compiler_params`; its Triton lowering is
deprecated from jax 0.11 on in favour of Mosaic GPU. Measured on one H200 (jax 0.11.2, Triton
3.6, device-check 2026-11-30): this kernel compiles, matches an fp32 reference (relative error
1.9e-3 for out, 2.5e-3 for the gradients, bf16 XLA attention 2.2e-3) and runs 134 / 174 / 185
useful TFLOP/s fwd+bwd at 8k / 16k / 32k (cuDNN causal: 406 / 427 / 451). The same body
through Mosaic GPU's pallas_call route does not lower: `dot_general` is unimplemented for its
warpgroup semantics, and the whole-row K/V blocks exceed shared memory (301064 > 232448 bytes
at L = 256). A Mosaic GPU kernel is a rewrite (explicit TMA pipelines, warpgroup matmuls over
swizzled shared-memory tiles, per-block barriers), not a change of call site. We stay on
Triton while it is present and works on every jax we support (0.10.2 - 0.11.x); what would
change that: jax removing the Triton lowering, a Triton regression on a supported jax, or a
Mosaic GPU kernel measured faster by `make device-check` (its mosaic_probe part re-tries this
body on every run).

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
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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
  """Tiles and Triton launch settings; None = from the table for the head widths and the
  device (`block_sizes_for`). The backward settings apply to the dq and the dk/dv kernels."""

  block_q: int | None = None
  block_kv: int | None = None
  block_q_bwd: int | None = None
  block_kv_bwd: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  num_warps_bwd: int | None = None
  num_stages_bwd: int | None = None


# --- defaults per head width and device -------------------------------------------------------
#
# Shared memory of one program (bytes; w = (Dqk + Dv) * itemsize, widths padded to powers of
# two). Resident operands stay in shared memory, the streamed blocks take one buffer per stage:
#   forward  stages * block_kv * w + block_q * Dqk * itemsize      (k, v streamed; q resident)
#   dq       stages_bwd * block_kv_bwd * w + block_q_bwd * w       (k, v streamed; q, do resident)
#   dk, dv   stages_bwd * block_q_bwd * w + block_kv_bwd * w       (q, do streamed; k, v resident)
# The forward formula reproduces the one figure Triton reported on an H200 (128 x 128 blocks, 2
# stages, widths 256 / 128, bf16: 262144 bytes requested of 232448).

# Largest shared memory per block (opt-in) by compute capability, from CUDA's tables.
SMEM_BYTES = {
  (8, 0): 166912,
  (8, 6): 101376,
  (8, 7): 166912,
  (8, 9): 101376,
  (9, 0): 232448,
  (10, 0): 232448,
  (12, 0): 101376,
}
SMEM_FALLBACK = 101376  # unknown device: the smallest figure of Ampere and later
SMEM_MARGIN = 8192  # left for Triton's own scratch (layout conversions, reductions)

# Preferred settings by padded query/key width (the widest entry <= Dqk applies), then shrunk to
# fit the device: NEO's 256 / 128 on one H200 (device-check 2026-11-30, L = 8k, fwd+bwd): best
# of 9 combinations, 2.80 ms against 3.58 ms for (128, 64, 64, 64, 8 warps, 2 stages). Narrower
# heads are not measured: the same rows hold twice the keys, so the forward kv block doubles.
PREFERRED = {
  256: BlockSizes(128, 32, 32, 64, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2),
  0: BlockSizes(128, 64, 64, 64, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2),
}
MIN_BLOCK = 16


def smem_bytes(sizes: BlockSizes, dqk: int, dv: int, itemsize: int = 2) -> dict[str, int]:
  """Shared memory per program of each kernel for complete `sizes` (formulas above)."""
  w = (dqk + dv) * itemsize
  return {
    "fwd": sizes.num_stages * sizes.block_kv * w + sizes.block_q * dqk * itemsize,
    "dq": sizes.num_stages_bwd * sizes.block_kv_bwd * w + sizes.block_q_bwd * w,
    "dkv": sizes.num_stages_bwd * sizes.block_q_bwd * w + sizes.block_kv_bwd * w,
  }


def fit_smem(sizes: BlockSizes, dqk: int, dv: int, itemsize: int, limit: int) -> BlockSizes:
  """`sizes` with the larger block of a kernel halved until every kernel fits in `limit`
  bytes (stages kept: pipelining is what the shared memory is for)."""
  while True:
    use = smem_bytes(sizes, dqk, dv, itemsize)
    if use["fwd"] > limit and max(sizes.block_q, sizes.block_kv) > MIN_BLOCK:
      field = "block_q" if sizes.block_q >= sizes.block_kv else "block_kv"
    elif (
      max(use["dq"], use["dkv"]) > limit and max(sizes.block_q_bwd, sizes.block_kv_bwd) > MIN_BLOCK
    ):
      field = "block_q_bwd" if sizes.block_q_bwd >= sizes.block_kv_bwd else "block_kv_bwd"
    else:
      return sizes
    sizes = dataclasses.replace(sizes, **{field: getattr(sizes, field) // 2})


def device_smem_bytes(device: jax.Device | None = None) -> int:
  """Shared memory per block of `device` (default: the first GPU; SMEM_FALLBACK if unknown)."""
  try:
    device = device or jax.devices("gpu")[0]
    major, minor = (int(x) for x in str(device.compute_capability).split(".")[:2])
  except (RuntimeError, AttributeError, ValueError):
    return SMEM_FALLBACK
  return SMEM_BYTES.get((major, minor), SMEM_FALLBACK)


def block_sizes_for(
  dqk: int, dv: int, dtype=jnp.bfloat16, sizes: BlockSizes | None = None, smem: int | None = None
) -> BlockSizes:
  """Complete BlockSizes for padded widths: the fields set in `sizes` as given, the others from
  PREFERRED fitted to `smem` bytes (default: this machine's GPU)."""
  width = max(w for w in PREFERRED if w <= dqk)
  limit = (device_smem_bytes() if smem is None else smem) - SMEM_MARGIN
  table = fit_smem(PREFERRED[width], dqk, dv, jnp.dtype(dtype).itemsize, limit)
  given = (
    {} if sizes is None else {k: v for k, v in dataclasses.asdict(sizes).items() if v is not None}
  )
  return dataclasses.replace(table, **given)


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int
  layout: fc.Layout
  interpret: bool
  launch: tuple[tuple[int, int], tuple[int, int]]  # (warps, stages) of forward, backward

  def compiler_params(self, backward: bool = False):
    if self.interpret or pl_triton is None:
      return None
    warps, stages = self.launch[int(backward)]
    return pl_triton.CompilerParams(num_warps=warps, num_stages=stages)

  @property
  def qk_scale(self) -> float:
    return self.scale * LOG2E  # logits in base 2: exp2(s * qk_scale) = exp(s * scale)


def _precision(dtype) -> jax.lax.Precision | None:
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, dims):
  return jax.lax.dot_general(
    a, b, dims, preferred_element_type=jnp.float32, precision=_precision(a.dtype)
  )


def _in_ranges(k_pos, r0, r1, r2, r3):
  return ((k_pos >= r0) & (k_pos < r1)) | ((k_pos >= r2) & (k_pos < r3))


def _walk(table_ref, offset: int, slots: int, step, carry):
  """Runs carry = step(block, carry) over one walk of a table (masks.interval_walk's layout).
  The table scalars are read once; a step costs slots - 1 compares, no division."""
  count = table_ref[offset]
  ends = [table_ref[offset + 1 + s] for s in range(slots - 1)]
  bases = [table_ref[offset + slots + s] for s in range(slots)]

  def body(t, carry):
    base = bases[-1]
    for end, b in zip(ends[::-1], bases[-2::-1]):
      base = jnp.where(t < end, b, base)
    return step(base + t, carry)

  return jax.lax.fori_loop(0, count, body, carry)


def _walk_q_block(qw_ref, step, carry):
  """The visited kv blocks of this q block: the fully allowed ones unmasked, then the rest
  masked. Two loops, no branch in either body, so loads and dots pipeline."""
  carry = _walk(
    qw_ref, masks.Q_WALK_FULL, masks.WALK_FULL_SLOTS, functools.partial(step, masked=False), carry
  )
  return _walk(
    qw_ref,
    masks.Q_WALK_PARTIAL,
    masks.WALK_PARTIAL_SLOTS,
    functools.partial(step, masked=True),
    carry,
  )


# --- forward ------------------------------------------------------------------------------------


def _fwd_kernel(qw_ref, q_ref, k_ref, v_ref, rng_ref, o_ref, lse_ref, *, cfg: _Config):
  bq, bk = cfg.block_q, cfg.block_kv
  q = q_ref[...]
  r = [rng_ref[c, :][:, None] for c in range(4)]  # [bq, 1] each
  kv_iota = jnp.arange(bk, dtype=jnp.int32)[None, :]
  qk_scale = cfg.qk_scale

  def step(j, carry, masked):
    acc, m, l = carry
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = _dot(q, k, NT)  # [bq, bk] raw logits; the scale goes into the exp2's argument (FMA)
    if masked:
      s = jnp.where(_in_ranges(start + kv_iota, *r), s, fc.MASK_VALUE)
    m_next = jnp.maximum(m, s.max(axis=1) * qk_scale)  # qk_scale > 0: max commutes
    alpha = jnp.exp2(m - m_next)
    p = jnp.exp2(s * qk_scale - m_next[:, None])  # exactly 0 where masked
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, NN)
    return acc, m_next, alpha * l + p.sum(axis=1)

  init = (
    jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
    jnp.full((bq,), fc.M_INIT, jnp.float32),
    jnp.zeros((bq,), jnp.float32),
  )
  acc, m, l = _walk_q_block(qw_ref, step, init)
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), 0.0)


def _forward(q, k, v, tables: _Tables, cfg: _Config):
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
      pl.BlockSpec((None, None, masks.Q_WALK_FIELDS), lambda i, bi, h: (bi, i, 0)),
      pl.BlockSpec((None, bq, None, dqk), lambda i, bi, h: (bi, i, h, 0)),
      pl.BlockSpec((None, lp, None, dqk), kv_map),
      pl.BlockSpec((None, lp, None, dv), kv_map),
      pl.BlockSpec((None, 4, bq), lambda i, bi, h: (bi, 0, i)),
    ],
    out_specs=[
      pl.BlockSpec((None, bq, None, dv), lambda i, bi, h: (bi, i, h, 0)),
      pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, lp, hq, dv), q.dtype),
      jax.ShapeDtypeStruct((b, hq, lp), jnp.float32),
    ],
    compiler_params=cfg.compiler_params(),
    interpret=cfg.interpret,
    name="neo_flash_fwd_gpu",
  )(tables.q_walk, q, k, v, tables.ranges_t)
  return out, lse


# --- backward: dq -------------------------------------------------------------------------------


def _dq_kernel(
  qw_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, rng_ref, dq_ref, *, cfg: _Config
):
  bk = cfg.block_kv_bwd
  q, do = q_ref[...], do_ref[...]
  lse, di = lse_ref[...][:, None], di_ref[...][:, None]
  r = [rng_ref[c, :][:, None] for c in range(4)]
  kv_iota = jnp.arange(bk, dtype=jnp.int32)[None, :]
  qk_scale = cfg.qk_scale

  def step(j, dq, masked):
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = _dot(q, k, NT)
    if masked:
      s = jnp.where(_in_ranges(start + kv_iota, *r), s, fc.MASK_VALUE)
    p = jnp.exp2(s * qk_scale - lse)
    ds = p * (_dot(do, v, NT) - di)
    return dq + _dot(ds.astype(k.dtype), k, NN)

  dq = _walk_q_block(qw_ref, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dq(q, k, v, do, lse, di, tables: _Tables, cfg: _Config):
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
      pl.BlockSpec((None, None, masks.Q_WALK_FIELDS), lambda i, bi, h: (bi, i, 0)),
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
    compiler_params=cfg.compiler_params(backward=True),
    interpret=cfg.interpret,
    name="neo_flash_dq_gpu",
  )(tables.q_walk, q, k, v, do, lse, di, tables.ranges_t)


# --- backward: dk, dv ---------------------------------------------------------------------------


def _dkv_kernel(
  kw_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, rng_ref, dk_ref, dv_ref, *, cfg: _Config
):
  bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[:, None]  # [bk, 1]
  qk_scale = cfg.qk_scale

  def step(g, i, carry, masked):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    q, do = q_ref[rows, g, :], do_ref[rows, g, :]
    lse, di = lse_ref[g, rows][None, :], di_ref[g, rows][None, :]
    s_t = _dot(k, q, NT)  # [bk, bq]
    if masked:
      r = [rng_ref[c, rows][None, :] for c in range(4)]
      s_t = jnp.where(_in_ranges(k_pos, *r), s_t, fc.MASK_VALUE)
    p_t = jnp.exp2(s_t * qk_scale - lse)
    dv = dv + _dot(p_t.astype(do.dtype), do, NN)
    ds_t = p_t * (_dot(v, do, NT) - di)
    return dk + _dot(ds_t.astype(q.dtype), q, NN), dv

  def head(g, carry):  # the G query heads of this kv head, one after the other
    # Query blocks of the hull that do not visit this kv block are in the partial walk:
    # computed fully masked, they add exactly zero (no branch around the loads and dots).
    carry = _walk(kw_ref, masks.KV_WALK_FULL, 1, functools.partial(step, g, masked=False), carry)
    return _walk(kw_ref, masks.KV_WALK_PARTIAL, 2, functools.partial(step, g, masked=True), carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = jax.lax.fori_loop(0, cfg.layout.group, head, init)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv(q, k, v, do, lse, di, tables: _Tables, cfg: _Config):
  lay = cfg.layout
  bk, g = cfg.block_kv_bwd, lay.group
  b, lp, hkv = lay.batch, lay.padded, lay.num_kv_heads
  dqk, dv = q.shape[-1], v.shape[-1]
  group_map = lambda j, bi, h: (bi, 0, h, 0, 0)
  kv_map = lambda j, bi, h: (bi, j, h, 0)
  return pl.pallas_call(
    functools.partial(_dkv_kernel, cfg=cfg),
    grid=(lp // bk, b, hkv),
    in_specs=[
      pl.BlockSpec((None, None, masks.KV_WALK_FIELDS), lambda j, bi, h: (bi, j, 0)),
      pl.BlockSpec((None, lp, None, g, dqk), group_map),
      pl.BlockSpec((None, bk, None, dqk), kv_map),
      pl.BlockSpec((None, bk, None, dv), kv_map),
      pl.BlockSpec((None, lp, None, g, dv), group_map),
      pl.BlockSpec((None, None, g, lp), lambda j, bi, h: (bi, h, 0, 0)),
      pl.BlockSpec((None, None, g, lp), lambda j, bi, h: (bi, h, 0, 0)),
      pl.BlockSpec((None, 4, lp), lambda j, bi, h: (bi, 0, 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, bk, None, dqk), kv_map),
      pl.BlockSpec((None, bk, None, dv), kv_map),
    ],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=cfg.compiler_params(backward=True),
    interpret=cfg.interpret,
    name="neo_flash_dkv_gpu",
  )(
    tables.kv_walk,
    q.reshape(b, lp, hkv, g, dqk),
    k,
    v,
    do.reshape(b, lp, hkv, g, dv),
    lse.reshape(b, hkv, g, lp),
    di.reshape(b, hkv, g, lp),
    tables.ranges_t,
  )


class _Tables(NamedTuple):
  """What the kernels read about the mask, for one pair of block sizes."""

  ranges_t: jax.Array  # int32 [B, 4, Lp]: per-query key intervals, one row per bound
  q_walk: jax.Array  # int32 [B, nq, masks.Q_WALK_FIELDS]
  kv_walk: jax.Array  # int32 [B, nk, masks.KV_WALK_FIELDS] (backward only; unused ones fold)


def _tables(ids: AttnIds, padded: int, block_q: int, block_kv: int) -> _Tables:
  t = fc.tables_for(ids, padded, block_q, block_kv)
  nk = padded // block_kv
  return _Tables(
    jnp.swapaxes(t.ranges, 1, 2),
    masks.q_block_walks(t.q_blocks, nk),
    masks.kv_block_walks(t.q_blocks, t.kv_blocks, nk),
  )


# --- custom_vjp ---------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, tables, tables_bwd, cfg):
  return _forward(q, k, v, tables, cfg)[0]


def _flash_fwd(q, k, v, tables, tables_bwd, cfg):
  out, lse = _forward(q, k, v, tables, cfg)
  out, lse = fc.name_saved(out, lse)
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


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  ids: AttnIds,
  *,
  scale: float,
  block_sizes: BlockSizes | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """Self-attention under the NEO rule. q [B, L, Hq, Dqk], k [B, L, Hkv, Dqk],
  v [B, L, Hkv, Dv] -> [B, L, Hq, Dv]; differentiable in q, k, v.

  `block_sizes`: fields left None come from `block_sizes_for` (head widths, this GPU).
  `interpret`: None compiles on GPU and interprets elsewhere.
  """
  if ids.positions is not None:
    raise ValueError(
      "pallas_gpu: explicit positions (cache slots) are not supported; use the "
      "reference for cross-attention"
    )
  if not scale > 0:
    raise ValueError(f"pallas_gpu: scale must be > 0, got {scale}")
  if interpret is None:
    interpret = not fc.on_backend("gpu")
  widths = lambda d: fc.next_pow2(max(d, 16))  # Triton tiles are powers of two
  sizes = block_sizes_for(widths(q.shape[-1]), widths(v.shape[-1]), q.dtype, block_sizes)
  length = q.shape[1]
  minimum = 8 if interpret else MIN_BLOCK
  bq, bk, bq_b, bk_b = (
    fc.fit_block(x, length, minimum)
    for x in (sizes.block_q, sizes.block_kv, sizes.block_q_bwd, sizes.block_kv_bwd)
  )
  lay = fc.layout_of(q, k, v, max(bq, bk, bq_b, bk_b))
  if not interpret:
    q, k = fc.pad_last(q, widths(lay.head_dim_qk)), fc.pad_last(k, widths(lay.head_dim_qk))
    v = fc.pad_last(v, widths(lay.head_dim_v))
  launch = ((sizes.num_warps, sizes.num_stages), (sizes.num_warps_bwd, sizes.num_stages_bwd))
  cfg = _Config(float(scale), bq, bk, bq_b, bk_b, lay, bool(interpret), launch)
  lp = lay.padded
  tables = _tables(ids, lp, bq, bk)
  tables_bwd = tables if (bq_b, bk_b) == (bq, bk) else _tables(ids, lp, bq_b, bk_b)
  pad = lambda x: fc.pad_length(x, lp)
  out = _flash(pad(q), pad(k), pad(v), tables, tables_bwd, cfg)
  return out[:, : lay.length, :, : lay.head_dim_v]


def compile_check(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  block_sizes: BlockSizes | None = None,
  interpret: bool | None = None,
) -> None:
  """Compiles and runs the forward and backward kernels once for the head counts, widths and
  dtype of q, k, v (arrays or ShapeDtypeStructs) on a short row with full, partial and skipped
  blocks; raises what lowering, compiling or launching raises (shared memory, registers).
  Safe to call while tracing or under a mesh: it runs on concrete zeros in its own thread."""
  (_, _, hq, dqk), hkv, dv = q.shape, k.shape[2], v.shape[3]
  widths = lambda d: fc.next_pow2(max(d, 16))
  sizes = block_sizes_for(widths(dqk), widths(dv), q.dtype, block_sizes)
  length = 2 * max(sizes.block_q, sizes.block_kv, sizes.block_q_bwd, sizes.block_kv_bwd)
  seg = np.zeros((1, length), np.int32)
  seg[:, : 3 * length // 4] = 1  # one causal text sample, then padding
  ids = AttnIds(seg, np.zeros_like(seg), None, None)
  zeros = lambda h, d: np.zeros((1, length, h, d), q.dtype)

  def fwd_bwd(q, k, v, d_out):
    out, vjp = jax.vjp(
      lambda q, k, v: flash_attention(
        q, k, v, ids, scale=1.0, block_sizes=sizes, interpret=interpret
      ),
      q,
      k,
      v,
    )
    return out, vjp(d_out)

  args = (zeros(hq, dqk), zeros(hkv, dqk), zeros(hkv, dv), zeros(hq, dv))
  errors = []

  def run():
    try:
      jax.block_until_ready(jax.jit(fwd_bwd).lower(*args).compile()(*args))
    except Exception as e:  # noqa: BLE001 - handed to the caller
      errors.append(e)

  # A thread of its own starts with no trace and no mesh (both are thread-local), so the check
  # is the same whether it is called at top level, while tracing a step, or under a mesh.
  worker = threading.Thread(target=run, name="pallas_gpu_compile_check")
  worker.start()
  worker.join()
  if errors:
    raise errors[0]
