"""XLA reference attention: the ground truth every kernel is tested against.

Shapes: q [B, Lq, Hq, Dqk], k [B, Lk, Hkv, Dqk], v [B, Lk, Hkv, Dv] with Hq % Hkv == 0 (GQA:
query head h reads KV head h // (Hq / Hkv)) and Dqk != Dv allowed (NEO: 256 and 128).
Scores are accumulated in float32, the softmax runs in float32 and the probabilities are cast
to the value dtype before the value product, as in the PyTorch reference. Products of
float32 inputs run at full precision (`Precision.HIGHEST`; a TPU would otherwise round them to
bfloat16), others at the default, as in the kernels. A query with no allowed key (padding)
gets a zero output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from neo_jax.ops.flash_common import matmul_precision
from neo_jax.ops.masks import AttnIds, dense_mask


def _grouped(q_blhd: jax.Array, num_kv_heads: int) -> jax.Array:
  b, l, h, d = q_blhd.shape
  if h % num_kv_heads:
    raise ValueError(f"query heads {h} not a multiple of key/value heads {num_kv_heads}")
  return q_blhd.reshape(b, l, num_kv_heads, h // num_kv_heads, d)


def attention_with_mask(
  q: jax.Array, k: jax.Array, v: jax.Array, mask_bqk: jax.Array, scale: float
) -> jax.Array:
  """Attention under an explicit bool mask [B, Lq, Lk]. Returns [B, Lq, Hq, Dv]."""
  b, lq, hq, _ = q.shape
  hkv = k.shape[2]
  q_blkgd = _grouped(q, hkv)
  scores = jnp.einsum(
    "blkgd,bskd->bkgls",
    q_blkgd,
    k,
    preferred_element_type=jnp.float32,
    precision=matmul_precision(q.dtype),
  )
  scores = scores * scale
  mask = mask_bqk[:, None, None, :, :]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0).astype(v.dtype)
  out = jnp.einsum(
    "bkgls,bskd->blkgd",
    probs,
    v,
    preferred_element_type=jnp.float32,
    precision=matmul_precision(v.dtype),
  )
  return out.reshape(b, lq, hq, v.shape[-1]).astype(v.dtype)


def attention_dense(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_ids: AttnIds,
  kv_ids: AttnIds | None = None,
  *,
  scale: float,
) -> jax.Array:
  """Materialises the [B, Lq, Lk] mask and all scores at once."""
  return attention_with_mask(q, k, v, dense_mask(q_ids, kv_ids), scale)


def attention_chunked(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_ids: AttnIds,
  kv_ids: AttnIds | None = None,
  *,
  scale: float,
  q_chunk: int = 512,
) -> jax.Array:
  """Same result, computed one query block at a time.

  Peak memory holds the scores of one [q_chunk, Lk] block per head instead of [Lq, Lk]; each
  block is rematerialised in the backward pass, so training memory stays O(q_chunk * Lk).
  """
  kv_ids = q_ids if kv_ids is None else kv_ids
  b, lq, hq, _ = q.shape
  chunk = min(q_chunk, lq)
  n_chunks = -(-lq // chunk)
  pad = n_chunks * chunk - lq
  full_q_ids = AttnIds(q_ids.segment_ids, q_ids.image_ids, q_ids.branches(), q_ids.seq_positions())
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    full_q_ids = AttnIds(*(jnp.pad(x, ((0, 0), (0, pad))) for x in full_q_ids))

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def one_block(start):
    q_block = jax.lax.dynamic_slice_in_dim(q, start, chunk, axis=1)
    ids_block = full_q_ids.slice(start, chunk)
    return attention_with_mask(q_block, k, v, dense_mask(ids_block, kv_ids), scale)

  starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
  out = jax.lax.map(one_block, starts)  # [n_chunks, B, chunk, Hq, Dv]
  out = jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * chunk, hq, v.shape[-1])
  return out[:, :lq]
