"""Chunked and vocabulary-streamed cross-entropy equal the plain one (values and gradients);
K-position selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from neo_jax.objectives.cross_entropy import (
  blocked_argmax,
  chunked_token_cross_entropy,
  select_supervised,
  streamed_cross_entropy,
  token_cross_entropy,
  weighted_next_token_loss,
)
from neo_jax.parallel import make_mesh

B, L, D, V = 2, 37, 16, 50


def _inputs(seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(k1, (B, L, D), jnp.float32)
  head = jax.random.normal(k2, (D, V), jnp.float32) * 0.3
  targets = jax.random.randint(k3, (B, L), 0, V)
  weights = jnp.where(
    jax.random.uniform(k4, (B, L)) < 0.4, jax.random.uniform(k4, (B, L)) + 0.5, 0.0
  )
  return hidden, head, targets, weights


def _plain_loss(hidden, head, targets, weights):
  ce, _ = token_cross_entropy(hidden, head, targets)
  return jnp.sum(weights * ce) / jnp.sum(weights)


def test_plain_cross_entropy_matches_log_softmax():
  hidden, head, targets, _ = _inputs()
  ce, _ = token_cross_entropy(hidden, head, targets)
  logp = jax.nn.log_softmax(hidden @ head, axis=-1)
  expected = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(ce, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])
def test_chunked_values_equal_plain(chunk):
  hidden, head, targets, _ = _inputs()
  plain, plain_ok = token_cross_entropy(hidden, head, targets)
  chunked, chunked_ok = chunked_token_cross_entropy(hidden, head, targets, chunk)
  np.testing.assert_allclose(chunked, plain, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(chunked_ok, plain_ok)


@pytest.mark.parametrize("vocab", [50, 384, 512])
def test_blocked_argmax_equals_argmax(vocab):
  """The first index of the largest value, like jnp.argmax, with ties across and inside
  blocks (384 = 24 blocks of 16, 512 = 8 blocks of 64, 50: jnp.argmax itself)."""
  x = jax.random.normal(jax.random.key(3), (3, 7, vocab))
  top = float(x.max()) + 1.0
  x = x.at[0, 0, [vocab - 1, 5]].set(top)  # tie: the first wins
  x = x.at[0, 1, [1, 2]].set(top)  # tie inside one block
  x = x.at[1, 2, :].set(0.25)  # a constant row: index 0
  x = x.at[2, 3, vocab - 1].set(top)  # the last entry
  expected = jnp.argmax(x, axis=-1)
  assert int(expected[0, 0]) == 5 and int(expected[1, 2]) == 0
  np.testing.assert_array_equal(jax.jit(blocked_argmax)(x), expected)


def test_blocked_argmax_with_the_vocabulary_split_over_devices():
  """With the vocabulary split over two devices (as mesh.tensor splits the head's logits) the
  result is jnp.argmax's, the largest value on either device."""
  mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
  x = jax.random.normal(jax.random.key(4), (2, 5, 1024))
  x = x.at[0, 0, [900, 700]].set(9.0).at[1, 1, [100, 600]].set(9.0)
  split = jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, None, "tensor")))
  with jax.set_mesh(mesh):
    got = jax.jit(blocked_argmax)(split)
  np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))
  assert int(got[0, 0]) == 700 and int(got[1, 1]) == 100


@pytest.mark.parametrize("fused", [True, False])
def test_fast_paths_count_correct_tokens_as_argmax(fused):
  """The chunked and fused heads (which take `blocked_argmax` over a 512-entry vocabulary)
  count a position correct exactly when jnp.argmax of its logits is the target."""
  hidden = jax.random.normal(jax.random.key(6), (B, L, D))
  head = jax.random.normal(jax.random.key(7), (D, 512)) * 0.3
  logits_argmax = jnp.argmax(hidden @ head, axis=-1)
  # half the targets are the argmax, so the count is neither 0 nor everything
  targets = jnp.where(jnp.arange(L) % 2 == 0, logits_argmax, (logits_argmax + 1) % 512)
  weights = jnp.ones((B, L))
  out = weighted_next_token_loss(hidden, head, targets, weights, chunk=8, fused=fused)
  expected = float((logits_argmax == targets).sum())
  assert float(out.metrics["correct_tokens"]) == expected == B * ((L + 1) // 2)


@pytest.mark.parametrize("remat", [True, False])
def test_chunked_gradients_equal_plain(remat):
  hidden, head, targets, weights = _inputs(1)

  def chunked_loss(h, w):
    out = weighted_next_token_loss(h, w, targets, weights, chunk=8, remat=remat)
    return out.loss_sum / out.weight_sum

  value, grads = jax.value_and_grad(chunked_loss, argnums=(0, 1))(hidden, head)
  ref_value, ref_grads = jax.value_and_grad(_plain_loss, argnums=(0, 1))(
    hidden, head, targets, weights
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def _all_eqns(jaxpr):
  """Every equation of a jaxpr, inside scans, maps and custom VJPs too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns"):
          yield from _all_eqns(sub)
        elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
          yield from _all_eqns(sub.jaxpr)


def _all_shapes(jaxpr) -> set:
  """Shapes of every value a jaxpr computes."""
  return {tuple(getattr(var.aval, "shape", ())) for eqn in _all_eqns(jaxpr) for var in eqn.outvars}


def test_chunked_never_builds_full_logits():
  """The jaxpr of the chunked loss holds no [B, L, V] array, forward or backward."""
  hidden, head, targets, weights = _inputs()
  fn = jax.grad(
    lambda h, w: weighted_next_token_loss(h, w, targets, weights, chunk=8).loss_sum, argnums=(0, 1)
  )
  shapes = _all_shapes(jax.make_jaxpr(fn)(hidden, head).jaxpr)
  assert (B, L, V) not in shapes and (B, 40, V) not in shapes
  assert (B, 8, V) in shapes


def test_select_supervised_first_k_in_order_and_overflow():
  weights = jnp.asarray(
    [[0, 1, 0, 2, 3, 0, 4], [0, 0, 0, 0, 0, 0, 5], [0, 0, 0, 0, 0, 0, 0]], jnp.float32
  )
  sel = select_supervised(weights, 3)
  np.testing.assert_array_equal(sel.index_bk, [[1, 3, 4], [6, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(sel.valid_bk, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(sel.overflow_b, [1, 0, 0])


def test_k_positions_equal_all_positions_when_k_suffices():
  hidden, head, targets, weights = _inputs(2)
  k = int((weights != 0).sum(-1).max())
  full = weighted_next_token_loss(hidden, head, targets, weights, chunk=8)
  gathered = weighted_next_token_loss(hidden, head, targets, weights, chunk=4, positions_per_row=k)
  np.testing.assert_allclose(gathered.loss_sum, full.loss_sum, rtol=1e-6)
  np.testing.assert_allclose(gathered.weight_sum, full.weight_sum, rtol=1e-6)
  assert float(gathered.metrics["overflow_tokens"]) == 0
  g_full = jax.grad(
    lambda h: weighted_next_token_loss(h, head, targets, weights, chunk=8).loss_sum
  )(hidden)
  g_k = jax.grad(
    lambda h: (
      weighted_next_token_loss(h, head, targets, weights, chunk=4, positions_per_row=k).loss_sum
    )
  )(hidden)
  np.testing.assert_allclose(g_k, g_full, rtol=1e-5, atol=1e-6)


def test_k_overflow_is_counted_and_excluded():
  hidden, head, targets, weights = _inputs(3)
  counts = (weights != 0).sum(-1)
  k = int(counts.min()) - 1
  out = weighted_next_token_loss(hidden, head, targets, weights, positions_per_row=k)
  assert float(out.metrics["overflow_tokens"]) == float(jnp.sum(counts - k))
  assert float(out.metrics["supervised_tokens"]) == B * k
  # the kept positions are the first k supervised ones of each row
  kept = np.zeros(weights.shape, bool)
  for b in range(B):
    kept[b, np.flatnonzero(np.asarray(weights[b]))[:k]] = True
  w_kept = jnp.where(kept, weights, 0.0)
  ref = weighted_next_token_loss(hidden, head, targets, w_kept)
  np.testing.assert_allclose(out.loss_sum, ref.loss_sum, rtol=1e-6)


def test_unsupervised_nonfinite_positions_do_not_leak():
  hidden, head, targets, weights = _inputs(4)
  hidden = hidden.at[0, 0].set(jnp.nan)
  weights = weights.at[0, 0].set(0.0)
  out = weighted_next_token_loss(hidden, head, targets, weights, chunk=8)
  assert np.isfinite(float(out.loss_sum))


def test_bfloat16_compute_stays_close():
  hidden, head, targets, weights = _inputs(5)
  f32 = weighted_next_token_loss(hidden, head, targets, weights)
  bf16 = weighted_next_token_loss(
    hidden.astype(jnp.bfloat16), head, targets, weights, compute_dtype=jnp.bfloat16
  )
  assert bf16.loss_sum.dtype == jnp.float32
  np.testing.assert_allclose(
    bf16.loss_sum / bf16.weight_sum, f32.loss_sum / f32.weight_sum, rtol=2e-2
  )


@pytest.mark.parametrize("piece", [1, 7, 10, 49, 50, 64])
def test_streamed_values_equal_plain(piece):
  """Pieces that divide V, that leave a short last piece, and one piece for all of V."""
  hidden, head, targets, _ = _inputs(6)
  plain, plain_ok = token_cross_entropy(hidden, head, targets)
  streamed, streamed_ok = jax.jit(streamed_cross_entropy, static_argnums=3)(
    hidden, head, targets, piece
  )
  np.testing.assert_allclose(streamed, plain, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(streamed_ok, plain_ok)


@pytest.mark.parametrize("piece", [7, 16])
def test_streamed_gradients_equal_plain(piece):
  hidden, head, targets, weights = _inputs(7)

  def streamed_loss(h, w):
    out = weighted_next_token_loss(h, w, targets, weights, chunk=8, vocab_chunk=piece)
    return out.loss_sum / out.weight_sum

  value, grads = jax.jit(jax.value_and_grad(streamed_loss, argnums=(0, 1)))(hidden, head)
  ref_value, ref_grads = jax.value_and_grad(_plain_loss, argnums=(0, 1))(
    hidden, head, targets, weights
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_streamed_never_builds_chunk_by_vocab_logits():
  hidden, head, targets, weights = _inputs()
  fn = jax.grad(
    lambda h, w: weighted_next_token_loss(h, w, targets, weights, chunk=8, vocab_chunk=16).loss_sum,
    argnums=(0, 1),
  )
  shapes = _all_shapes(jax.make_jaxpr(fn)(hidden, head).jaxpr)
  assert not any(len(s) == 3 and s[-1] == V for s in shapes)
  assert (B, 8, 16) in shapes


def _rel(a, b) -> float:
  """Relative L2 distance of two arrays (what "equal to 1e-6" means for gradients here)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("chunk", [5, 8, 37, 64])
@pytest.mark.parametrize("k", [0, 9])
def test_fused_loss_equals_unfused_values_and_gradients(chunk, k):
  """The fused head (gradients from the forward pass) against autodiff of the chunked loss:
  loss, metrics and the gradients of hidden, head and weights, to 1e-6."""
  hidden, head, targets, weights = _inputs(5)

  def loss(fused, remat):
    def fn(h, w, wt):
      out = weighted_next_token_loss(
        h, w, targets, wt, chunk=chunk, positions_per_row=k, fused=fused, remat=remat
      )
      return out.loss_sum / out.weight_sum, out.metrics

    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))

  (value, metrics), grads = loss(True, True)(hidden, head, weights)
  for remat in (True, False):
    (ref_value, ref_metrics), ref_grads = loss(False, remat)(hidden, head, weights)
    assert _rel(value, ref_value) <= 1e-6
    for g, r in zip(grads, ref_grads):
      assert _rel(g, r) <= 1e-6
    for name in ref_metrics:
      np.testing.assert_array_equal(metrics[name], ref_metrics[name])
  assert float(jnp.abs(grads[2]).max()) > 0  # weights do get a gradient


def test_fused_loss_scales_by_the_cotangent():
  """The backward pass multiplies the forward's gradients by whatever flows in."""
  hidden, head, targets, weights = _inputs(6)
  loss = lambda h, scale: (
    scale * weighted_next_token_loss(h, head, targets, weights, chunk=8).loss_sum ** 2
  )
  ref = lambda h, scale: (
    scale * weighted_next_token_loss(h, head, targets, weights, chunk=8, fused=False).loss_sum ** 2
  )
  for scale in (1.0, -2.5):
    assert _rel(jax.grad(loss)(hidden, scale), jax.grad(ref)(hidden, scale)) <= 1e-6


def _head_matmuls(fn, *args) -> int:
  """dot_generals of a jaxpr (scans and custom VJPs included) with the vocabulary in a shape."""
  return sum(
    any(V in tuple(v.aval.shape) for v in list(eqn.invars) + list(eqn.outvars))
    for eqn in _all_eqns(jax.make_jaxpr(fn)(*args).jaxpr)
    if eqn.primitive.name == "dot_general"
  )


def test_fused_loss_runs_three_head_matmuls():
  """Value and gradient cost three head matmuls per chunk (logits, d hidden, d head); the
  unfused loss with remat runs four, and the fused primal (no gradient) one."""
  hidden, head, targets, weights = _inputs(7)
  grad = lambda fused: jax.value_and_grad(
    lambda h, w: (
      weighted_next_token_loss(h, w, targets, weights, chunk=8, fused=fused, remat=True).loss_sum
    ),
    argnums=(0, 1),
  )
  assert _head_matmuls(grad(True), hidden, head) == 3
  assert _head_matmuls(grad(False), hidden, head) == 4
  value = lambda h, w: weighted_next_token_loss(h, w, targets, weights, chunk=8).loss_sum
  assert _head_matmuls(value, hidden, head) == 1


def test_fused_loss_gradients_ignore_nonfinite_unsupervised_positions():
  hidden, head, targets, weights = _inputs(8)
  hidden = hidden.at[1, 3].set(jnp.nan)
  weights = weights.at[1, 3].set(0.0)
  grads = jax.grad(
    lambda h, w: weighted_next_token_loss(h, w, targets, weights, chunk=8).loss_sum, argnums=(0, 1)
  )(hidden, head)
  assert np.isfinite(np.asarray(grads[1])).all()
  assert np.isfinite(np.delete(np.asarray(grads[0]).reshape(B * L, D), L + 3, axis=0)).all()


def test_fused_loss_bfloat16_matches_unfused():
  hidden, head, targets, weights = _inputs(9)
  fn = lambda fused: jax.grad(
    lambda h, w: (
      weighted_next_token_loss(
        h, w, targets, weights, chunk=8, compute_dtype=jnp.bfloat16, fused=fused
      ).loss_sum
    ),
    argnums=(0, 1),
  )(hidden, head)
  for g, r in zip(fn(True), fn(False)):
    assert _rel(g, r) <= 2e-2
