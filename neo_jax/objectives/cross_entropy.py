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

All losses return sums (loss_sum = sum(w * CE), weight_sum = sum(w)); the step divides once
over the global batch and every micro-batch, so loss = sum(w * CE) / sum(w) exactly.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from neo_jax.trainer.objective import LossOutput


def token_cross_entropy(hidden_bld: jax.Array, head_dv: jax.Array, targets_bl: jax.Array,
                        compute_dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Plain reference: CE and argmax-correctness per position, float32 [B, L] each."""
  logits = jnp.einsum("bld,dv->blv", hidden_bld.astype(compute_dtype),
                      head_dv.astype(compute_dtype), preferred_element_type=jnp.float32)
  return _ce_from_logits(logits, targets_bl)


def _ce_from_logits(logits_bcv: jax.Array, targets_bc: jax.Array) -> tuple[jax.Array, jax.Array]:
  lse = jax.nn.logsumexp(logits_bcv, axis=-1)
  target_logit = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
  correct = jax.lax.stop_gradient(jnp.argmax(logits_bcv, axis=-1) == targets_bc)
  return lse - target_logit, correct.astype(jnp.float32)


def _vocab_pieces(vocab: int, piece: int) -> tuple[int, int]:
  """(n, size): n full pieces of `size` entries; the remainder (< n entries) is one more."""
  n = -(-vocab // max(1, min(piece, vocab)))
  return n, vocab // n


def _piece_logits(h_bcd: jax.Array, w_pd: jax.Array, compute_dtype: Any) -> jax.Array:
  return jnp.einsum("bcd,pd->bcp", h_bcd.astype(compute_dtype), w_pd.astype(compute_dtype),
                    preferred_element_type=jnp.float32)


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

  init = (jnp.full(t_bc.shape, -jnp.inf, jnp.float32), jnp.zeros(t_bc.shape, jnp.float32),
          jnp.zeros(t_bc.shape, jnp.float32))
  carry, _ = jax.lax.scan(body, init, jnp.arange(n, dtype=jnp.int32))
  if n * size < vocab:  # the short last piece
    carry = update(carry, w_vd[n * size:], jnp.int32(n * size))
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
    dh = jnp.einsum("bcp,pd->bcd", d, w_pd.astype(compute_dtype),
                    preferred_element_type=jnp.float32)
    dw = jnp.einsum("bcp,bcd->pd", d, h_bcd.astype(compute_dtype),
                    preferred_element_type=jnp.float32)
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
    dh_tail, dw_tail = piece_grads(w_vd[n * size:], jnp.int32(n * size))
    dh = dh + dh_tail
    dw = dw.at[n * size:].set(dw_tail.astype(dw.dtype))
  return dh.astype(h_bcd.dtype), dw, None


_streamed_ce.defvjp(_streamed_ce_fwd, _streamed_ce_bwd)


def streamed_cross_entropy(hidden_bcd: jax.Array, head_dv: jax.Array, targets_bc: jax.Array,
                           vocab_chunk: int, compute_dtype: Any = jnp.float32
                           ) -> tuple[jax.Array, jax.Array]:
  """`token_cross_entropy` computed `vocab_chunk` vocabulary entries at a time.

  Logits never exist beyond [B, C, vocab_chunk]; the backward pass recomputes each piece
  (one more head matmul) instead of reading saved logits. "Correct" means the target's logit
  is the largest (a tie counts as correct, where argmax would pick the first).
  """
  return _streamed_ce(hidden_bcd, head_dv.T, targets_bc, int(vocab_chunk),
                      jnp.dtype(compute_dtype))


def chunked_token_cross_entropy(hidden_bld: jax.Array, head_dv: jax.Array,
                                targets_bl: jax.Array, chunk: int = 1024,
                                compute_dtype: Any = jnp.float32, remat: bool = True,
                                vocab_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Same values as `token_cross_entropy`, computed at most `chunk` positions at a time.

  Peak memory for logits is B * chunk * V float32 in forward and backward (with `remat` the
  chunk is recomputed in the backward pass instead of kept); the head gradient accumulates
  across chunks. The chunk is evened out (L = 48 with chunk 32 runs 2 chunks of 24, not 64
  padded positions). `vocab_chunk` > 0 streams each chunk over the vocabulary as well
  (`streamed_cross_entropy`; `remat` is then moot: nothing of size V is kept).
  """
  b, l, d = hidden_bld.shape
  n_chunks = -(-l // max(1, min(chunk, l)))
  chunk = -(-l // n_chunks)
  pad = n_chunks * chunk - l
  if pad:
    hidden_bld = jnp.pad(hidden_bld, ((0, 0), (0, pad), (0, 0)))
    targets_bl = jnp.pad(targets_bl, ((0, 0), (0, pad)))
  hidden_nbcd = jnp.moveaxis(hidden_bld.reshape(b, n_chunks, chunk, d), 1, 0)
  targets_nbc = jnp.moveaxis(targets_bl.reshape(b, n_chunks, chunk), 1, 0)
  head = head_dv.astype(compute_dtype)

  stream = 0 < vocab_chunk < head.shape[1]

  def one_chunk(args):
    h_bcd, t_bc = args
    if stream:
      return streamed_cross_entropy(h_bcd, head, t_bc, vocab_chunk, compute_dtype)
    logits = jnp.einsum("bcd,dv->bcv", h_bcd.astype(compute_dtype), head,
                        preferred_element_type=jnp.float32)
    return _ce_from_logits(logits, t_bc)

  if remat and not stream:  # a streamed chunk keeps nothing of size V to recompute
    one_chunk = jax.checkpoint(one_chunk, prevent_cse=False)

  ce_nbc, correct_nbc = jax.lax.map(one_chunk, (hidden_nbcd, targets_nbc))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n_chunks * chunk)[:, :l]
  return unchunk(ce_nbc), unchunk(correct_nbc)


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
  return Selected(jnp.where(valid_bk, index_bk, 0), valid_bk,
                  jnp.maximum(count_b - k, 0))


def weighted_next_token_loss(hidden_bld: jax.Array, head_dv: jax.Array, targets_bl: jax.Array,
                             weights_bl: jax.Array, *, chunk: int = 1024,
                             positions_per_row: int = 0, compute_dtype: Any = jnp.float32,
                             remat: bool = True, vocab_chunk: int = 0) -> LossOutput:
  """sum(w * CE) and sum(w) of a batch, chunked; optionally over K positions per row.

  `positions_per_row` = K > 0 gathers the first K supervised positions of each row before the
  head (cost B*K*D*V instead of B*L*D*V); 0 computes every position. `vocab_chunk` > 0
  streams the head over the vocabulary (see chunked_token_cross_entropy).
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
  ce_bl, correct_bl = chunked_token_cross_entropy(hidden_bld, head_dv, targets_bl, chunk,
                                                  compute_dtype, remat, vocab_chunk)
  supervised = (weights_bl != 0).astype(jnp.float32)
  # where(w != 0, ...) keeps a NaN/Inf CE of unsupervised (padding) positions out of the sum
  loss_sum = jnp.sum(jnp.where(weights_bl != 0, weights_bl * ce_bl, 0.0))
  metrics = {
      "supervised_tokens": supervised.sum(),
      "correct_tokens": (correct_bl * supervised).sum(),
      "overflow_tokens": overflow.astype(jnp.float32),
  }
  return LossOutput(loss_sum, weights_bl.sum(), metrics)
