"""Pallas kernels (interpret mode on CPU) against the XLA reference: values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from neo_jax.ops import pallas_gpu, pallas_tpu, reference
from neo_jax.ops.layouts import ids_from_arrays, random_batch

KERNELS = {
  "pallas_tpu": lambda blocks: functools.partial(
    pallas_tpu.flash_attention, block_sizes=pallas_tpu.BlockSizes(*blocks)
  ),
  "pallas_gpu": lambda blocks: functools.partial(
    pallas_gpu.flash_attention, block_sizes=pallas_gpu.BlockSizes(*blocks, *blocks[::-1])
  ),
}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel_err(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def make_inputs(seed, batch, length, hq, hkv, dqk, dv, dtype, **layout_kw):
  rng = np.random.default_rng(seed)
  ids = ids_from_arrays(*random_batch(rng, batch, length, **layout_kw))
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, hq, dqk), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (batch, length, hkv, dqk), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (batch, length, hkv, dv), jnp.float32).astype(dtype)
  d_out = jax.random.normal(keys[3], (batch, length, hq, dv), jnp.float32).astype(dtype)
  return q, k, v, d_out, ids


def value_and_grads(fn, q, k, v, d_out):
  """out and (dq, dk, dv) of sum(out * d_out), i.e. the VJP with cotangent d_out."""
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(d_out)


def check_against_reference(fn, q, k, v, d_out, ids, scale, tol):
  # ground truth: the reference in float32 on the same (possibly bf16-rounded) inputs
  f32 = lambda x: x.astype(jnp.float32)
  ref = jax.jit(
    lambda q, k, v, g: value_and_grads(
      lambda q, k, v: reference.attention_dense(q, k, v, ids, scale=scale), q, k, v, g
    )
  )
  got = jax.jit(
    lambda q, k, v, g: value_and_grads(lambda q, k, v: fn(q, k, v, ids, scale=scale), q, k, v, g)
  )
  want_out, want_grads = ref(f32(q), f32(k), f32(v), f32(d_out))
  out, grads = got(q, k, v, d_out)
  assert out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
  errors = {"out": rel_err(out, want_out)}
  errors.update({name: rel_err(g, w) for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads)})
  assert max(errors.values()) <= tol, errors
  return out, grads


LAYOUT = dict(preference_prob=0.5, image_len=(4, 40), text_len=(2, 24), max_samples=4)


CASES = {
  # 2 rows of 256 tokens, several samples with images, preference pairs and padding; GQA 4/2;
  # query/key width 64 != value width 32; 64 x 32 blocks so most blocks are skipped or partial
  "f32": dict(dtype=jnp.float32, shape=(2, 256, 4, 2, 64, 32), blocks=(64, 32), scale=0.125),
  # NEO's widths (256 / 128, scale 1/sqrt(128)) in bf16, L = 200 (padded to the blocks)
  "bf16": dict(
    dtype=jnp.bfloat16, shape=(1, 200, 4, 2, 256, 128), blocks=(64, 64), scale=128**-0.5
  ),
}


@pytest.mark.parametrize("impl", sorted(KERNELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_random_layouts(impl, case):
  c = CASES[case]
  q, k, v, d_out, ids = make_inputs(0, *c["shape"], c["dtype"], **LAYOUT)
  check_against_reference(
    KERNELS[impl](c["blocks"]), q, k, v, d_out, ids, c["scale"], TOL[c["dtype"]]
  )


def test_tpu_kernel_under_tpu_interpret_params():
  # the TPU interpreter simulates DMAs and VMEM, raises on out-of-bounds reads and fills
  # uninitialised memory with NaN (a scratch read before its init would show)
  q, k, v, d_out, ids = make_inputs(3, 1, 64, 2, 1, 32, 16, jnp.float32, **LAYOUT)
  fn = functools.partial(
    pallas_tpu.flash_attention,
    block_sizes=pallas_tpu.BlockSizes(32, 16),
    interpret=pltpu.InterpretParams(),
  )
  check_against_reference(fn, q, k, v, d_out, ids, 0.25, TOL[jnp.float32])


def neo_width_inputs(length, seed):
  """ids of one random packed row and zero q, k, v at NEO's widths (4 / 2 heads, bf16): what
  the lowering tests trace."""
  seg, img, branch = random_batch(
    np.random.default_rng(seed),
    1,
    length,
    image_len=(length // 11, length // 3),
    text_len=(10, 100),
  )
  zeros = lambda h, d: jnp.zeros((1, length, h, d), jnp.bfloat16)
  return ids_from_arrays(seg, img, branch), zeros(4, 256), zeros(2, 256), zeros(2, 128)


@pytest.mark.parametrize(
  "impl,platform,call", [("pallas_tpu", "tpu", "tpu_custom_call"), ("pallas_gpu", "cuda", "triton")]
)
def test_kernels_lower_for_their_hardware(impl, platform, call):
  # Pallas -> Mosaic / Triton lowering of the compiled (non-interpret) kernels, forward and
  # backward, at NEO's widths and bf16: catches ops or shapes the hardware path cannot take
  ids, q, k, v = neo_width_inputs(1100, 4)
  module = pallas_tpu if impl == "pallas_tpu" else pallas_gpu
  fwd = lambda q, k, v: module.flash_attention(q, k, v, ids, scale=128**-0.5, interpret=False)
  bwd = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  for fn, count in ((fwd, 1), (bwd, 3)):
    text = jax.jit(fn).trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(call) >= count
