"""Every fast path of the training loss equals the plain one: the loss and the gradients of
all parameters to 1e-6 (relative L2 of the whole gradient), each parameter's gradient to 5e-6,
on packed rows with images.

The plain loss: dense reference attention and autodiff of the chunked cross-entropy, on one
device. In float32 the plain gradient itself sits about 1e-6 (up to 2.5e-6 on small norm
scales) from the float64 value, so these bounds are as tight as float32 allows. The MLP
activation's own backward (`layers.swiglu`, used by both) is checked against autodiff
directly.
"""

import collections
import contextlib
import functools

import jax
import jax.extend
import numpy as np
import pytest

from neo_jax.config import tiny
from neo_jax.data.synthetic import SyntheticSpec, compact_vocab, synthetic_batch
from neo_jax.model import init_params
from neo_jax.model.layers import swiglu
from neo_jax.objectives.cross_entropy import DEFAULT_CHUNK
from neo_jax.objectives.next_token import next_token_loss
from neo_jax.ops import xla_flash
from neo_jax.parallel import make_mesh
from neo_jax.parallel.sharding import mesh_context, replicated
from neo_jax.trainer.state import param_shardings

CFG = compact_vocab(tiny(num_hidden_layers=2, num_prebuffer_layers=1), 512)
SPEC = SyntheticSpec.for_model(CFG, batch_size=2, seq_len=96, visual_tokens=24, max_image_tokens=9)
PLAIN = dict(attention_impl="xla", fused=False, remat=False)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _mean_loss(config, batch, **loss_kw):
  """The training loss of `batch` as a function of the parameters: sum(w * CE) / sum(w)."""
  loss_fn = next_token_loss(config, **loss_kw)

  def loss(params):
    out = loss_fn(params, batch)
    return out.loss_sum / out.weight_sum

  return loss


@functools.cache
def _value_and_grads(
  tied: bool,
  k: int,
  attention_impl: str,
  block: int = 512,
  chunk: int = 32,
  tensor: int = 1,
  remat_policy: str = "none",
  **loss_kw,
):
  """Loss and gradients; `tensor` > 1 runs them tensor-parallel over that many devices, the
  weights split by the sharding rules as a training run splits them."""
  config = CFG.replace(
    tie_word_embeddings=tied,
    attention_impl=attention_impl,
    attention_q_chunk=block,
    remat_policy=remat_policy,
  )
  params = init_params(config, jax.random.key(0))
  batch = {key: jax.numpy.asarray(v) for key, v in synthetic_batch(SPEC, 0).items()}
  context = contextlib.nullcontext()
  if tensor > 1:
    mesh = make_mesh(data=1, fsdp=1, tensor=tensor, devices=jax.devices()[:tensor])
    params = jax.device_put(params, param_shardings(config, mesh))
    batch = jax.device_put(batch, replicated(mesh))
    assert params["embed_tokens"]["embedding"].sharding.spec[0] == "tensor"  # vocabulary split
    context = mesh_context(mesh)
  loss = _mean_loss(config, batch, chunk=chunk, positions_per_row=k, **loss_kw)
  with context:
    return jax.device_get(jax.jit(jax.value_and_grad(loss))(params))


def _assert_equal_step(fast: dict, tied: bool = False, k: int = 0):
  value, grads = _value_and_grads(tied, k, **fast)
  ref_value, ref_grads = _value_and_grads(tied, k, **PLAIN)
  assert _rel(value, ref_value) <= 1e-6, (value, ref_value)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  assert _rel(flat(grads), flat(ref_grads)) <= 1e-6
  errors = jax.tree.map(_rel, grads, ref_grads)
  assert max(jax.tree.leaves(errors)) <= 5e-6, errors
  assert min(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 0  # every leaf moves


@pytest.mark.parametrize("tied,k", [(True, 0), (False, 24)])
def test_fused_head_equals_plain(tied, k):
  _assert_equal_step(dict(attention_impl="xla", fused=True), tied, k)


@pytest.mark.parametrize("chunk", [40, DEFAULT_CHUNK])
def test_fused_head_chunks_equal_plain(chunk):
  """Three uneven chunks of a 96-token row, and the default (one chunk here)."""
  _assert_equal_step(dict(attention_impl="xla", fused=True, chunk=chunk))


@pytest.mark.parametrize("block", [16, xla_flash.DEFAULT_BLOCK])
def test_xla_flash_attention_equals_plain(block):
  _assert_equal_step(dict(attention_impl="xla_flash", block=block, fused=False, remat=False))


def test_cpu_default_equals_plain():
  """What `auto` runs on CPU with the default loss, against the plain loss."""
  _assert_equal_step(dict(attention_impl="auto"))


@pytest.mark.parametrize("tied", [False, True])
def test_cpu_default_tensor_parallel_over_two_devices_equals_plain(tied):
  """The CPU default split over two host devices (mesh.tensor=2: heads, MLP width and
  vocabulary halved, attention per head shard), which `benchmarks/train_step_vs_torch.py`
  times as `jax:tensor=2`."""
  _assert_equal_step(dict(attention_impl="auto", tensor=2), tied)


@pytest.mark.parametrize("dtype,tol", [(jax.numpy.float32, 1e-6), (jax.numpy.bfloat16, 2e-2)])
def test_swiglu_equals_autodiff_of_silu_times_up(dtype, tol):
  """The MLP's activation (a custom VJP keeping only gate and up) against autodiff of
  silu(gate) * up: value and both input gradients, over large negative and positive gates."""
  keys = jax.random.split(jax.random.key(3), 3)
  gate, up, d_out = (6 * jax.random.normal(k, (4, 64, 96)) for k in keys)
  gate, up, d_out = (x.astype(dtype) for x in (gate, up, d_out))
  plain = lambda g, u: jax.nn.silu(g) * u
  out, vjp = jax.vjp(swiglu, gate, up)
  ref_out, ref_vjp = jax.vjp(plain, gate, up)
  assert _rel(out.astype(np.float32), ref_out.astype(np.float32)) <= tol
  for got, want in zip(vjp(d_out), ref_vjp(d_out)):
    assert got.dtype == want.dtype
    assert _rel(got.astype(np.float32), want.astype(np.float32)) <= tol


@pytest.mark.parametrize("tensor", [1, 2])
def test_remat_keeping_matmuls_and_attention_equals_plain(tensor):
  """`remat_policy="dots_attention"` on the CPU default, on one device and split over two."""
  _assert_equal_step(dict(attention_impl="auto", remat_policy="dots_attention", tensor=tensor))


def _primitive_counts(remat_policy: str) -> collections.Counter:
  """How often each primitive appears in the jaxpr of the differentiated step (sub-jaxprs
  included): what the backward pass recomputes shows up as extra copies."""
  config = CFG.replace(attention_impl="xla_flash", remat_policy=remat_policy)
  params = init_params(config, jax.random.key(0))
  batch = {key: jax.numpy.asarray(v) for key, v in synthetic_batch(SPEC, 0).items()}
  loss = _mean_loss(config, batch)
  counts = collections.Counter()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      counts[eqn.primitive.name] += 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
  return counts


def test_remat_keeping_attention_recomputes_no_attention_and_no_matmul():
  """The "dots_attention" policy recomputes the norms (more rsqrt than without remat) but not
  the flash kernel's loops nor any matmul; "dots_no_batch" runs attention's forward again."""
  none, kept, dots = (_primitive_counts(p) for p in ("none", "dots_attention", "dots_no_batch"))
  assert kept["rsqrt"] > none["rsqrt"]
  for name in ("while", "exp", "dot_general"):
    assert kept[name] == none[name], name
  assert dots["while"] > none["while"] and dots["exp"] > none["exp"]
