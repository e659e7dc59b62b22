"""The attention entry point: impl selection, kernels behind it, cross-attention fallback,
the compile-time fallback of `auto`."""

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_kernels import LAYOUT, make_inputs, rel_err

from neo_jax.ops import attention as attn_api
from neo_jax.ops import pallas_gpu, reference
from neo_jax.ops.layouts import ids_from_arrays
from neo_jax.ops.masks import AttnIds


def test_auto_picks_per_backend():
  assert attn_api.resolve("auto", "cpu") == "xla_flash"
  assert attn_api.resolve("auto", "tpu") == "pallas_tpu"
  assert attn_api.resolve("auto", "gpu") == "pallas_gpu"
  assert set(attn_api.available()) >= {
    "xla",
    "xla_chunked",
    "xla_flash",
    "pallas_tpu",
    "pallas_gpu",
    "auto",
  }
  with pytest.raises(ValueError, match="not available"):
    attn_api.resolve("flash")


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "auto"])
def test_entry_point_self_and_cross_attention(impl):
  q, k, v, _, ids = make_inputs(5, 2, 96, 4, 2, 32, 16, jnp.float32, **LAYOUT)
  want = reference.attention_dense(q, k, v, ids, scale=0.2)
  got = jax.jit(
    lambda q, k, v, ids: attn_api.attention(q, k, v, ids, impl=impl, scale=0.2, q_chunk=32)
  )(q, k, v, ids)
  assert rel_err(got, want) <= 1e-5
  # decoding: 3 new tokens at cache slots 93..95 against the whole cache (kv_ids given)
  slots = jnp.broadcast_to(jnp.arange(93, 96, dtype=jnp.int32), (2, 3))
  q_ids = AttnIds(ids.segment_ids[:, 93:], ids.image_ids[:, 93:], None, slots)
  kv_ids = AttnIds(ids.segment_ids, ids.image_ids, None, None)
  got = attn_api.attention(q[:, 93:], k, v, q_ids, kv_ids, impl=impl, scale=0.2)
  want = reference.attention_dense(q[:, 93:], k, v, q_ids, kv_ids, scale=0.2)
  assert rel_err(got, want) <= 1e-5


def test_bad_shapes_are_reported():
  q = jnp.zeros((1, 16, 3, 8))
  k = v = jnp.zeros((1, 16, 2, 8))
  ids = ids_from_arrays(np.ones((1, 16), np.int32), np.zeros((1, 16), np.int32))
  with pytest.raises(ValueError, match="multiple"):
    attn_api.attention(q, k, v, ids, impl="pallas_tpu")


def test_kernel_on_a_foreign_backend_is_refused(monkeypatch):
  # a Triton kernel cannot run compiled on TPU (and the TPU kernel not on GPU); only CPU
  # interprets them
  q, k, v, _, ids = make_inputs(6, 1, 32, 2, 1, 16, 8, jnp.float32)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="runs on gpu"):
    attn_api.attention(q, k, v, ids, impl="pallas_gpu")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="runs on tpu"):
    attn_api.attention(q, k, v, ids, impl="pallas_tpu")


@pytest.mark.parametrize("dtype,highest", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_reference_precision_is_explicit(dtype, highest):
  # float32 products run at full precision whatever the global default (a TPU would round
  # them to bfloat16), bfloat16 at the default: what the kernels do
  q, k, v, _, ids = make_inputs(7, 1, 32, 4, 2, 16, 8, dtype)
  fn = lambda q, k, v: reference.attention_dense(q, k, v, ids, scale=0.25)
  with jax.default_matmul_precision("default"):  # the program carries it, not a global flag
    jaxpr = jax.make_jaxpr(fn)(q, k, v)
    dots = re.findall(r"dot_general.*", jax.jit(fn).lower(q, k, v).as_text())
  eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  want = (jax.lax.Precision.HIGHEST if highest else jax.lax.Precision.DEFAULT,) * 2
  assert len(eqns) == 2 and all(e.params["precision"] == want for e in eqns)
  assert len(dots) == 2
  assert all(("precision = [HIGHEST, HIGHEST]" in d) == highest for d in dots), dots


def _fake_gpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attn_api, "_CHECKED", {})


def test_auto_falls_back_when_the_kernel_does_not_compile(monkeypatch):
  # A "GPU" that is a CPU: the Triton kernel really cannot be compiled here, so `auto` takes
  # the chunked reference, with one warning naming the error, and warns no more for the shape
  q, k, v, _, ids = make_inputs(9, 1, 64, 4, 2, 32, 16, jnp.float32, **LAYOUT)
  want = reference.attention_dense(q, k, v, ids, scale=0.2)
  _fake_gpu(monkeypatch)
  assert attn_api.resolve("auto") == "pallas_gpu"
  with pytest.warns(attn_api.KernelFallbackWarning, match="pallas_gpu does not compile") as w:
    got = attn_api.attention(q, k, v, ids, impl="auto", scale=0.2, q_chunk=32)
  assert len(w) == 1
  assert rel_err(got, want) <= 1e-5
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(
      lambda q, k, v, ids: attn_api.attention(q, k, v, ids, impl="auto", scale=0.2, q_chunk=32)
    )(q, k, v, ids)


def test_explicit_kernel_never_falls_back(monkeypatch):
  # the same forced failure: `auto` names it in its warning, an explicit impl raises it
  q, k, v, _, ids = make_inputs(9, 1, 64, 4, 2, 32, 16, jnp.float32, **LAYOUT)
  _fake_gpu(monkeypatch)

  def fail(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Shared memory size limit exceeded (forced)")

  monkeypatch.setattr(pallas_gpu, "_forward", fail)
  with pytest.warns(attn_api.KernelFallbackWarning, match="RuntimeError: RESOURCE_EXHAUSTED"):
    attn_api.attention(q, k, v, ids, impl="auto", scale=0.2, q_chunk=32)
  with pytest.raises(RuntimeError, match="forced"):
    attn_api.attention(q, k, v, ids, impl="pallas_gpu", scale=0.2)


def test_compile_check_runs_once_per_shape(monkeypatch):
  calls = []
  _fake_gpu(monkeypatch)
  spec = attn_api._IMPLS["pallas_gpu"]
  monkeypatch.setitem(
    attn_api._IMPLS,
    "pallas_gpu",
    dataclasses.replace(spec, check=lambda q, k, v: calls.append((q.shape, v.shape))),
  )
  q, k, v = jnp.zeros((2, 8, 4, 32)), jnp.zeros((2, 8, 2, 32)), jnp.zeros((2, 8, 2, 16))
  for length in (8, 16):  # rows of another length or batch share the check
    pick = attn_api._compiling("pallas_gpu", q[:, :length], k[:, :length], v[:, :length])
    assert pick == "pallas_gpu"
  assert attn_api._compiling("pallas_gpu", q, k, v[..., :8]) == "pallas_gpu"
  assert len(calls) == 2


@pytest.mark.parametrize(
  "platform,targets",
  [
    ("tpu", {"tpu_custom_call"}),
    ("cuda", {"__gpu$xla.gpu.triton", "triton_kernel_call_ffi"}),  # jaxlib <= 0.10.2, later
    ("cpu", set()),
  ],
)
def test_platform_decides_what_auto_lowers(monkeypatch, platform, targets):
  # lowering for another platform from this CPU host: `auto` resolves for that platform and
  # its kernel is traced compiled (the Mosaic / Triton call, not the interpreter); the compile
  # check is never run for a platform this host does not have
  checked = []
  spec = attn_api._IMPLS["pallas_gpu"]
  monkeypatch.setitem(
    attn_api._IMPLS,
    "pallas_gpu",
    dataclasses.replace(spec, check=lambda q, k, v: checked.append(q.shape)),
  )
  q, k, v, _, ids = make_inputs(3, 1, 256, 4, 2, 64, 32, jnp.bfloat16, **LAYOUT)
  loss = lambda q, k, v: (
    attn_api.attention(q, k, v, ids, impl="auto", scale=0.2, platform=platform)
    .astype(jnp.float32)
    .sum()
  )
  text = (
    jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    .trace(q, k, v)
    .lower(lowering_platforms=(platform,))
    .as_text()
  )
  calls = re.findall(r"stablehlo\.custom_call @([^(\s]+)\(", text)
  assert set(calls) <= targets and len(calls) == (3 if targets else 0)  # fwd, dq, dk/dv
  assert not checked
  with pytest.raises(ValueError, match="'pallas_tpu' runs on tpu .* not on cuda"):
    attn_api.attention(q, k, v, ids, impl="pallas_tpu", scale=0.2, platform="cuda")


def test_compile_check_in_interpret_mode_and_its_errors(monkeypatch):
  # what `auto` runs on a GPU, here interpreted: it passes inside a trace and under a mesh
  # (its own thread), and hands the kernel's error to the caller
  q, k, v = (
    jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, 8, 2, 16), (1, 8, 1, 16), (1, 8, 1, 8))
  )
  small = pallas_gpu.BlockSizes(8, 8, 8, 8)
  check = lambda: pallas_gpu.compile_check(q, k, v, block_sizes=small, interpret=True)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    assert float(jax.jit(lambda x: (check(), x + 1)[1])(jnp.float32(1))) == 2.0

  def fail(*args, **kwargs):
    raise RuntimeError("forced")

  monkeypatch.setattr(pallas_gpu, "_forward", fail)
  with pytest.raises(RuntimeError, match="forced"):
    check()
