"""Next-token cross-entropy without materialising [B, L, V] float32 logits.

At L = 16k and V = 152k the full logits would take 10 GB per row in float32. Instead the
positions are cut into chunks: each chunk computes hidden_chunk @ head -> logsumexp -> target
logit under `jax.checkpoint`, so forward and backward hold the logits of one chunk at a time.
Optionally only the first K supervised positions of each row are gathered first (SFT rows
supervise a few answer tokens among thousands); rows with more than K report the excess as
`overflow_tokens` instead of dropping them silently.

With `vocab_chunk` > 0 each chunk also streams over the vocabulary (`streamed_cross_entropy`):
pieces of the head small enough to stay in cache, an online logsumexp, and a custom VJP that
recomputes each piece in the backward pass. It bounds the logits' memory by [chunk, piece]
instead of [chunk, V] for one more head matmul; on the tiny model on CPU it runs at the speed
of the plain chunk (benchmarks/README.md). Keep the vocabulary unsplit over devices with it
(the pieces are dynamic slices along V).

The weighted next-token loss (`weighted_next_token_loss`) fuses the head's backward pass into
its forward pass (`fused_weighted_cross_entropy`): each chunk's gradients with respect to the
hidden states and the head are computed while its logits are live, and the backward pass only
scales them by the incoming cotangent. Three head matmuls per position, as plain autodiff
without recomputation, and nothing of size V outlives its chunk.

All losses return sums (loss_sum = sum(w * CE), weight_sum = sum(w)); the step divides once
over the global batch and every micro-batch, so loss = sum(w * CE) / sum(w) exactly.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from neo_jax.trainer.objective import LossOutput

# Positions per head chunk. Live logits are B * chunk * V float32 (0.3 GB per row at V = 152k);
# on 2 CPU cores 512 runs the 177.5M NEO's step as fast as 1024 in 0.6 GB less memory, 256
# costs ~10% more time (benchmarks/README.md, "Training step against PyTorch").
DEFAULT_CHUNK = 512


def token_cross_entropy(
  hidden_bld: jax.Array, head_dv: jax.Array, targets_bl: jax.Array, compute_dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array]:
  """Plain reference: CE and argmax-correctness per position, float32 [B, L] each."""
  logits = jnp.einsum(
    "bld,dv->blv",
    hidden_bld.astype(compute_dtype),
    head_dv.astype(compute_dtype),
    preferred_element_type=jnp.float32,
  )
  return _ce_from_logits(logits, targets_bl)


def _ce_from_logits(
  logits_bcv: jax.Array, targets_bc: jax.Array, blocked: bool = False
) -> tuple[jax.Array, jax.Array]:
  """CE and correctness per position (the prediction by `blocked_argmax` if `blocked`, the
  same index faster, else by jnp.argmax as the reference)."""
  lse = jax.nn.logsumexp(logits_bcv, axis=-1)
  target_logit = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
  predicted = blocked_argmax(logits_bcv) if blocked else jnp.argmax(logits_bcv, axis=-1)
  correct = jax.lax.stop_gradient(predicted == targets_bc)
  return lse - target_logit, correct.astype(jnp.float32)


# Vocabulary entries per block of `blocked_argmax`; the number of blocks must split evenly over
# up to 8 devices when the vocabulary is sharded.
_ARGMAX_BLOCKS = (64, 32, 16, 8)
_ARGMAX_MAX_SHARDS = 8


def blocked_argmax(x_bcv: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first index of the largest value), in two passes.

  XLA:CPU runs argmax as a two-operand (value, index) reduction: 176 ms over [512, 151,936]
  float32 logits on 2 cores, where a plain max takes 14 ms and this 29 ms
  (benchmarks/head_reductions.py). Here a plain max per block of a few entries, argmax over
  the block maxima (the first block holding the largest value), then argmax inside that
  block: the same index for every row without NaN. A vocabulary no block size divides evenly
  (into a block count that splits over 8 devices) takes jnp.argmax.
  """
  *lead, v = x_bcv.shape
  block = next((b for b in _ARGMAX_BLOCKS if v % (b * _ARGMAX_MAX_SHARDS) == 0), 0)
  if not block:
    return jnp.argmax(x_bcv, axis=-1)
  x_bnk = x_bcv.reshape(*lead, v // block, block)
  first_block = jnp.argmax(x_bnk.max(axis=-1), axis=-1)
  inside = jnp.take_along_axis(x_bnk, first_block[..., None, None], axis=-2)[..., 0, :]
  return first_block * block + jnp.argmax(inside, axis=-1)


def _vocab_pieces(vocab: int, piece: int) -> tuple[int, int]:
  """(n, size): n full pieces of `size` entries; the remainder (< n entries) is one more."""
  n = -(-vocab // max(1, min(piece, vocab)))
  return n, vocab // n


def _piece_logits(h_bcd: jax.Array, w_pd: jax.Array, compute_dtype: Any) -> jax.Array:
  return jnp.einsum(
    "bcd,pd->bcp",
    h_bcd.astype(compute_dtype),
    w_pd.astype(compute_dtype),
    preferred_element_type=jnp.float32,
  )


def _hits(targets_bc: jax.Array, offset: jax.Array, size: int) -> jax.Array:
  iota = jax.lax.broadcasted_iota(jnp.int32, targets_bc.shape + (size,), 2)
  return iota + offset == targets_bc[..., None]


def _streamed_stats(h_bcd, w_vd, t_bc, piece, compute_dtype):
  """Running max, sum of exp(logit - max) and the target logit over the vocabulary pieces."""
  vocab = w_vd.shape[0]
  n, size = _vocab_pieces(vocab, piece)

  def update(carry, w_pd, offset):
    m, s, tl = carry
    logits = _piece_logits(h_bcd, w_pd, compute_dtype)
    m_new = jnp.maximum(m, logits.max(axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(axis=-1)
    tl = tl + jnp.where(_hits(t_bc, offset, w_pd.shape[0]), logits, 0.0).sum(axis=-1)
    return m_new, s, tl

  def body(carry, i):
    offset = i * size
    return update(carry, jax.lax.dynamic_slice_in_dim(w_vd, offset, size, axis=0), offset), None

  init = (
    jnp.full(t_bc.shape, -jnp.inf, jnp.float32),
    jnp.zeros(t_bc.shape, jnp.float32),
    jnp.zeros(t_bc.shape, jnp.float32),
  )
  carry, _ = jax.lax.scan(body, init, jnp.arange(n, dtype=jnp.int32))
  if n * size < vocab:  # the short last piece
    carry = update(carry, w_vd[n * size :], jnp.int32(n * size))
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _streamed_ce(h_bcd, w_vd, t_bc, piece, compute_dtype):
  return _streamed_ce_fwd(h_bcd, w_vd, t_bc, piece, compute_dtype)[0]


def _streamed_ce_fwd(h_bcd, w_vd, t_bc, piece, compute_dtype):
  m, s, tl = _streamed_stats(h_bcd, w_vd, t_bc, piece, compute_dtype)
  lse = m + jnp.log(s)
  correct = (tl >= m).astype(jnp.float32)  # the target has the largest logit (argmax)
  return (lse - tl, correct), (h_bcd, w_vd, t_bc, lse)


def _streamed_ce_bwd(piece, compute_dtype, residuals, cotangents):
  h_bcd, w_vd, t_bc, lse = residuals
  g_bc = cotangents[0]  # `correct` has no gradient
  vocab = w_vd.shape[0]
  n, size = _vocab_pieces(vocab, piece)

  def piece_grads(w_pd, offset):
    """d CE / d logits of one piece (softmax - one-hot), then both matmul gradients."""
    logits = _piece_logits(h_bcd, w_pd, compute_dtype)
    d = jnp.exp(logits - lse[..., None]) - _hits(t_bc, offset, w_pd.shape[0])
    # positions without weight (padding, possibly non-finite) contribute nothing
    d = jnp.where(g_bc[..., None] != 0, d * g_bc[..., None], 0.0).astype(compute_dtype)
    dh = jnp.einsum(
      "bcp,pd->bcd", d, w_pd.astype(compute_dtype), preferred_element_type=jnp.float32
    )
    dw = jnp.einsum(
      "bcp,bcd->pd", d, h_bcd.astype(compute_dtype), preferred_element_type=jnp.float32
    )
    return dh, dw

  def body(carry, i):
    dh_acc, dw_acc = carry
    offset = i * size
    dh, dw = piece_grads(jax.lax.dynamic_slice_in_dim(w_vd, offset, size, axis=0), offset)
    dw_acc = jax.lax.dynamic_update_slice_in_dim(dw_acc, dw.astype(dw_acc.dtype), offset, axis=0)
    return (dh_acc + dh, dw_acc), None

  init = (jnp.zeros(h_bcd.shape, jnp.float32), jnp.zeros(w_vd.shape, w_vd.dtype))
  (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(n, dtype=jnp.int32))
  if n * size < vocab:
    dh_tail, dw_tail = piece_grads(w_vd[n * size :], jnp.int32(n * size))
    dh = dh + dh_tail
    dw = dw.at[n * size :].set(dw_tail.astype(dw.dtype))
  return dh.astype(h_bcd.dtype), dw, None


_streamed_ce.defvjp(_streamed_ce_fwd, _streamed_ce_bwd)


def streamed_cross_entropy(
  hidden_bcd: jax.Array,
  head_dv: jax.Array,
  targets_bc: jax.Array,
  vocab_chunk: int,
  compute_dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
  """`token_cross_entropy` computed `vocab_chunk` vocabulary entries at a time.

  Logits never exist beyond [B, C, vocab_chunk]; the backward pass recomputes each piece
  (one more head matmul) instead of reading saved logits. "Correct" means the target's logit
  is the largest (a tie counts as correct, where argmax would pick the first).
  """
  return _streamed_ce(hidden_bcd, head_dv.T, targets_bc, int(vocab_chunk), jnp.dtype(compute_dtype))


def chunked_token_cross_entropy(
  hidden_bld: jax.Array,
  head_dv: jax.Array,
  targets_bl: jax.Array,
  chunk: int = DEFAULT_CHUNK,
  compute_dtype: Any = jnp.float32,
  remat: bool = True,
  vocab_chunk: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """Same values as `token_cross_entropy`, computed at most `chunk` positions at a time.

  Peak memory for logits is B * chunk * V float32 in forward and backward (with `remat` the
  chunk is recomputed in the backward pass instead of kept); the head gradient accumulates
  across chunks. The chunk is evened out (L = 48 with chunk 32 runs 2 chunks of 24, not 64
  padded positions). `vocab_chunk` > 0 streams each chunk over the vocabulary as well
  (`streamed_cross_entropy`; `remat` is then moot: nothing of size V is kept).
  """
  (hidden_nbcd, targets_nbc), unchunk = _split_chunks((hidden_bld, targets_bl), chunk)
  head = head_dv.astype(compute_dtype)

  stream = 0 < vocab_chunk < head.shape[1]

  def one_chunk(args):
    h_bcd, t_bc = args
    if stream:
      return streamed_cross_entropy(h_bcd, head, t_bc, vocab_chunk, compute_dtype)
    logits = jnp.einsum(
      "bcd,dv->bcv", h_bcd.astype(compute_dtype), head, preferred_element_type=jnp.float32
    )
    return _ce_from_logits(logits, t_bc, blocked=True)

  if remat and not stream:  # a streamed chunk keeps nothing of size V to recompute
    one_chunk = jax.checkpoint(one_chunk, prevent_cse=False)

  ce_nbc, correct_nbc = jax.lax.map(one_chunk, (hidden_nbcd, targets_nbc))
  return unchunk(ce_nbc), unchunk(correct_nbc)


def _split_chunks(arrays_bl: tuple, chunk: int) -> tuple[tuple, Any]:
  """[B, L, ...] arrays -> [n, B, C, ...] chunks of C <= `chunk` positions, zero-padded (the
  chunk is evened out: L = 48 with chunk 32 runs 2 chunks of 24, not 64 padded positions),
  and the function that takes a [n, B, C, ...] result back to [B, L, ...]."""
  b, l = arrays_bl[0].shape[:2]
  n_chunks = -(-l // max(1, min(chunk, l)))
  chunk = -(-l // n_chunks)
  pad = n_chunks * chunk - l

  def split(x):
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x
    return jnp.moveaxis(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 1, 0)

  def unchunk(x_nbc):
    return jnp.moveaxis(x_nbc, 0, 1).reshape(b, n_chunks * chunk, *x_nbc.shape[3:])[:, :l]

  return tuple(split(x) for x in arrays_bl), unchunk


def _weighted_sum(ce_bl: jax.Array, weights_bl: jax.Array) -> jax.Array:
  # where(w != 0, ...) keeps a NaN/Inf CE of unsupervised (padding) positions out of the sum
  return jnp.sum(jnp.where(weights_bl != 0, weights_bl * ce_bl, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_ce(h_bld, w_dv, t_bl, wt_bl, chunk, compute_dtype):
  ce_bl, correct_bl = chunked_token_cross_entropy(
    h_bld, w_dv, t_bl, chunk, compute_dtype, remat=False
  )
  return _weighted_sum(ce_bl, wt_bl), correct_bl


def _fused_ce_fwd(h_bld, w_dv, t_bl, wt_bl, chunk, compute_dtype):
  (h_nbcd, t_nbc, wt_nbc), unchunk = _split_chunks((h_bld, t_bl, wt_bl), chunk)
  head = w_dv.astype(compute_dtype)

  def one_chunk(dw_dv, xs):
    """Loss terms of one chunk and their gradients, from the chunk's logits while they live."""
    h_bcd, t_bc, wt_bc = xs
    h_bcd = h_bcd.astype(compute_dtype)
    logits = jnp.einsum("bcd,dv->bcv", h_bcd, head, preferred_element_type=jnp.float32)
    m = logits.max(axis=-1)
    e = jnp.exp(logits - m[..., None])
    s = e.sum(axis=-1)
    target_logit = jnp.take_along_axis(logits, t_bc[..., None], axis=-1)[..., 0]
    ce = m + jnp.log(s) - target_logit
    correct = (blocked_argmax(logits) == t_bc).astype(jnp.float32)
    # d (w CE) / d logits = w (softmax - one-hot); positions without weight contribute nothing
    keep = (wt_bc != 0)[..., None]
    one_hot = _hits(t_bc, 0, logits.shape[-1])
    d = jnp.where(
      keep, e * (wt_bc / s)[..., None] - jnp.where(one_hot, wt_bc[..., None], 0.0), 0.0
    ).astype(compute_dtype)
    dh = jnp.einsum("bcv,dv->bcd", d, head, preferred_element_type=jnp.float32)
    dw = jnp.einsum("bcd,bcv->dv", jnp.where(keep, h_bcd, 0), d, preferred_element_type=jnp.float32)
    return dw_dv + dw, (dh, ce, correct)

  dw_dv, (dh_nbcd, ce_nbc, correct_nbc) = jax.lax.scan(
    one_chunk, jnp.zeros(w_dv.shape, jnp.float32), (h_nbcd, t_nbc, wt_nbc)
  )
  ce_bl = unchunk(ce_nbc)
  residuals = (
    unchunk(dh_nbcd).astype(h_bld.dtype),
    dw_dv.astype(w_dv.dtype),
    jnp.where(wt_bl != 0, ce_bl, 0.0),
  )
  return (_weighted_sum(ce_bl, wt_bl), unchunk(correct_nbc)), residuals


def _fused_ce_bwd(chunk, compute_dtype, residuals, cotangents):
  dh_bld, dw_dv, ce_bl = residuals
  g = cotangents[0]  # `correct` has no gradient
  return (
    (g * dh_bld).astype(dh_bld.dtype),
    (g * dw_dv).astype(dw_dv.dtype),
    None,
    (g * ce_bl).astype(ce_bl.dtype),
  )


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def fused_weighted_cross_entropy(
  hidden_bld: jax.Array,
  head_dv: jax.Array,
  targets_bl: jax.Array,
  weights_bl: jax.Array,
  chunk: int = DEFAULT_CHUNK,
  compute_dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
  """(sum(w * CE), correct [B, L]) with the head's gradients computed in the forward pass.

  Under differentiation each chunk of at most `chunk` positions computes its logits, the
  softmax and, from them, d/d hidden and d/d head of sum(w * CE) (three head matmuls, the
  logits never recomputed or kept); the backward pass scales these by the cotangent. Without
  differentiation it is `chunked_token_cross_entropy` and the weighted sum. Weights are
  differentiable too (d/dw = CE where w != 0).
  """
  return _fused_ce(
    hidden_bld,
    head_dv,
    targets_bl,
    weights_bl.astype(jnp.float32),
    int(chunk),
    jnp.dtype(compute_dtype),
  )


class Selected(NamedTuple):
  """The first K supervised positions of each row."""

  index_bk: jax.Array  # int32 [B, K] positions into L (0 where unused)
  valid_bk: jax.Array  # bool [B, K]
  overflow_b: jax.Array  # int32 [B]: supervised positions beyond K (not in the loss)


def select_supervised(weights_bl: jax.Array, k: int) -> Selected:
  """Indices of the first `k` positions with non-zero weight in each row, in order."""
  supervised = weights_bl != 0
  count_b = supervised.sum(axis=-1, dtype=jnp.int32)
  # a stable sort of "not supervised" puts supervised positions first, in sequence order
  order_bl = jnp.argsort(~supervised, axis=-1, stable=True).astype(jnp.int32)
  if k > order_bl.shape[-1]:
    order_bl = jnp.pad(order_bl, ((0, 0), (0, k - order_bl.shape[-1])))
  index_bk = order_bl[:, :k]
  valid_bk = jnp.arange(k, dtype=jnp.int32)[None, :] < count_b[:, None]
  return Selected(jnp.where(valid_bk, index_bk, 0), valid_bk, jnp.maximum(count_b - k, 0))


def weighted_next_token_loss(
  hidden_bld: jax.Array,
  head_dv: jax.Array,
  targets_bl: jax.Array,
  weights_bl: jax.Array,
  *,
  chunk: int = DEFAULT_CHUNK,
  positions_per_row: int = 0,
  compute_dtype: Any = jnp.float32,
  remat: bool = True,
  vocab_chunk: int = 0,
  fused: bool = True,
) -> LossOutput:
  """sum(w * CE) and sum(w) of a batch, chunked; optionally over K positions per row.

  `positions_per_row` = K > 0 gathers the first K supervised positions of each row before the
  head (cost B*K*D*V instead of B*L*D*V); 0 computes every position. `vocab_chunk` > 0
  streams the head over the vocabulary (see chunked_token_cross_entropy). Otherwise the head
  runs fused with its backward pass (`fused_weighted_cross_entropy`, nothing to recompute);
  `fused=False` differentiates the chunked cross-entropy instead (with `remat`, recomputing
  each chunk's logits), the same values by another route.
  """
  weights_bl = weights_bl.astype(jnp.float32)
  overflow = jnp.zeros((), jnp.int32)
  if positions_per_row > 0:
    sel = select_supervised(weights_bl, positions_per_row)
    take = lambda x: jnp.take_along_axis(x, sel.index_bk, axis=1)
    hidden_bld = jnp.take_along_axis(hidden_bld, sel.index_bk[..., None], axis=1)
    targets_bl = take(targets_bl)
    weights_bl = jnp.where(sel.valid_bk, take(weights_bl), 0.0)
    overflow = sel.overflow_b.sum()
  if fused and not 0 < vocab_chunk < head_dv.shape[1]:
    loss_sum, correct_bl = fused_weighted_cross_entropy(
      hidden_bld, head_dv, targets_bl, weights_bl, chunk, compute_dtype
    )
  else:
    ce_bl, correct_bl = chunked_token_cross_entropy(
      hidden_bld, head_dv, targets_bl, chunk, compute_dtype, remat, vocab_chunk
    )
    loss_sum = _weighted_sum(ce_bl, weights_bl)
  supervised = (weights_bl != 0).astype(jnp.float32)
  metrics = {
    "supervised_tokens": supervised.sum(),
    "correct_tokens": (correct_bl * supervised).sum(),
    "overflow_tokens": overflow.astype(jnp.float32),
  }
  return LossOutput(loss_sum, weights_bl.sum(), metrics)
