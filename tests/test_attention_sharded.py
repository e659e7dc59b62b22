"""Kernels under a mesh: `jax.shard_map` over batch and heads equals the reference.

Uses the 8 virtual CPU devices of conftest.py and a (data, fsdp, tensor) mesh with Auto axes,
activated with `jax.set_mesh`, as the training code does, and the same mesh with Explicit axes
(`jax.make_mesh`'s default since jax 0.7).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_attention_kernels import LAYOUT, make_inputs, rel_err, value_and_grads

from neo_jax.errors import UserError
from neo_jax.ops import attention as attn_api
from neo_jax.ops import reference
from neo_jax.ops.layouts import ids_from_arrays, random_batch


def mesh(data, fsdp, tensor, axis_type=AxisType.Auto):
  return jax.make_mesh(
    (data, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3
  )


def run_sharded(m, impl, q, k, v, d_out, ids, scale=0.2):
  """Values and gradients of the entry point under mesh `m`, inputs placed on the mesh."""
  with jax.set_mesh(m):
    put = lambda x, spec: jax.device_put(x, NamedSharding(m, spec))
    batch = P(("data", "fsdp"), None, "tensor", None)
    q, d_out = put(q, batch), put(d_out, batch)
    kv_spec = batch if k.shape[2] % m.shape["tensor"] == 0 else P(("data", "fsdp"))
    k, v = put(k, kv_spec), put(v, kv_spec)
    fn = lambda q, k, v, g, ids: value_and_grads(
      lambda q, k, v: attn_api.attention(q, k, v, ids, impl=impl, scale=scale), q, k, v, g
    )
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v, d_out, ids))
    return jax.jit(fn)(q, k, v, d_out, ids), jaxpr


def reference_values(q, k, v, d_out, ids, scale=0.2):
  return value_and_grads(
    lambda q, k, v: reference.attention_dense(q, k, v, ids, scale=scale), q, k, v, d_out
  )


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_sharded_kernel_equals_reference(impl):
  # batch 4 over data=2 x fsdp=2, 4 query / 2 kv heads over tensor=2
  q, k, v, d_out, ids = make_inputs(10, 4, 128, 4, 2, 32, 16, jnp.float32, **LAYOUT)
  (out, grads), jaxpr = run_sharded(mesh(2, 2, 2), impl, q, k, v, d_out, ids)
  assert "shard_map" in jaxpr
  want_out, want_grads = reference_values(q, k, v, d_out, ids)
  assert rel_err(out, want_out) <= 1e-5
  for g, w in zip(grads, want_grads):
    assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_kv_heads_fewer_than_head_shards(axis_type):
  # 2 kv heads on tensor=4: each kv head is repeated once so that heads still split; the
  # gradients of the repeated copies add up in dk, dv
  q, k, v, d_out, ids = make_inputs(11, 2, 96, 8, 2, 32, 16, jnp.float32, **LAYOUT)
  (out, grads), jaxpr = run_sharded(mesh(2, 1, 4, axis_type), "pallas_tpu", q, k, v, d_out, ids)
  assert "shard_map" in jaxpr
  want_out, want_grads = reference_values(q, k, v, d_out, ids)
  assert rel_err(out, want_out) <= 1e-5
  for g, w in zip(grads, want_grads):
    assert rel_err(g, w) <= 1e-5


def test_axes_that_do_not_divide_are_left_out():
  # batch 2 cannot split over data*fsdp = 4: only data (2) is used; 3 query heads / 1 kv head
  # do not split over tensor = 2: heads stay whole
  m = mesh(2, 2, 2)
  assert attn_api._usable_axes(m.abstract_mesh, ("data", "fsdp"), 2) == ("data",)
  assert attn_api._usable_axes(m.abstract_mesh, ("tensor",), 3) == ()
  q, k, v, d_out, ids = make_inputs(12, 2, 64, 3, 1, 16, 8, jnp.float32, **LAYOUT)
  with jax.set_mesh(m):
    out = jax.jit(
      lambda q, k, v, ids: attn_api.attention(q, k, v, ids, impl="pallas_gpu", scale=0.2)
    )(q, k, v, ids)
  assert rel_err(out, reference.attention_dense(q, k, v, ids, scale=0.2)) <= 1e-5


def test_mesh_axis_names_are_configurable():
  # a mesh with other names: tell the entry point which axes carry batch and heads
  m = jax.make_mesh((4, 2), ("replica", "model"), axis_types=(AxisType.Auto,) * 2)
  q, k, v, _, ids = make_inputs(13, 4, 64, 2, 2, 16, 8, jnp.float32, **LAYOUT)
  axes = attn_api.MeshAxes(batch=("replica",), heads=("model",))
  with jax.set_mesh(m):
    fn = lambda q, k, v, ids: attn_api.attention(
      q, k, v, ids, impl="pallas_tpu", scale=0.2, mesh_axes=axes
    )
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, ids))
    out = jax.jit(fn)(q, k, v, ids)
  assert rel_err(out, reference.attention_dense(q, k, v, ids, scale=0.2)) <= 1e-5


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernel_under_explicit_axes(impl):
  # Explicit axes: the inputs arrive sharded otherwise than the kernel splits them (q over
  # data only, k over fsdp, v replicated) and are resharded to whole rows and heads per shard;
  # the output is sharded like q
  m = mesh(2, 2, 2, AxisType.Explicit)
  q, k, v, d_out, ids = make_inputs(14, 4, 128, 4, 2, 32, 16, jnp.float32, **LAYOUT)
  with jax.set_mesh(m):
    put = lambda x, spec: jax.device_put(x, NamedSharding(m, spec))
    qs, gs = put(q, P("data", None, "tensor")), put(d_out, P("data", None, "tensor"))
    ks, vs = put(k, P("fsdp")), put(v, P())
    ids_s = jax.tree.map(lambda a: put(a, P("data")), ids)
    fn = lambda q, k, v, g, ids: value_and_grads(
      lambda q, k, v: attn_api.attention(q, k, v, ids, impl=impl, scale=0.2), q, k, v, g
    )
    assert "shard_map" in str(jax.make_jaxpr(fn)(qs, ks, vs, gs, ids_s))
    out, grads = jax.jit(fn)(qs, ks, vs, gs, ids_s)
  assert out.sharding.spec == P("data", None, "tensor", None)
  want_out, want_grads = reference_values(q, k, v, d_out, ids)
  assert rel_err(out, want_out) <= 1e-5
  for g, w in zip(grads, want_grads):
    assert rel_err(g, w) <= 1e-5


def test_explicit_axes_that_split_nothing():
  # batch 1 and 3 query heads split over no axis: the kernel still runs inside a shard_map
  # (pallas_call cannot take Explicit-typed arrays), replicated over the whole mesh
  m = mesh(2, 2, 2, AxisType.Explicit)
  q, k, v, _, ids = make_inputs(15, 1, 64, 3, 1, 16, 8, jnp.float32, **LAYOUT)
  with jax.set_mesh(m):
    out = jax.jit(
      lambda q, k, v, ids: attn_api.attention(q, k, v, ids, impl="pallas_tpu", scale=0.2)
    )(q, k, v, ids)
  assert rel_err(out, reference.attention_dense(q, k, v, ids, scale=0.2)) <= 1e-5


def test_explicit_sequence_sharding_is_refused():
  m = mesh(2, 2, 2, AxisType.Explicit)
  q, k, v, _, ids = make_inputs(16, 2, 64, 2, 2, 16, 8, jnp.float32, **LAYOUT)
  with jax.set_mesh(m):
    q = jax.device_put(q, NamedSharding(m, P(None, "fsdp")))
    with pytest.raises(UserError, match="sequence axis of q is sharded over mesh axis 'fsdp'"):
      jax.jit(lambda q, k, v, ids: attn_api.attention(q, k, v, ids, impl="pallas_gpu", scale=0.2))(
        q, k, v, ids
      )


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_compiled_tpu_kernel_lowers_under_a_mesh(axis_type):
  # the compiled (Mosaic) kernel inside the entry point's shard_map, forward and backward,
  # exported for TPU from this CPU host over the 8-device mesh
  b, length = 4, 600
  ids = ids_from_arrays(*random_batch(np.random.default_rng(5), b, length, **LAYOUT))
  m = mesh(2, 2, 2, axis_type)
  spec = NamedSharding(m, P(("data", "fsdp"), None, "tensor"))
  q = jax.ShapeDtypeStruct((b, length, 4, 256), jnp.bfloat16, sharding=spec)
  k = jax.ShapeDtypeStruct((b, length, 2, 256), jnp.bfloat16, sharding=spec)
  v = jax.ShapeDtypeStruct((b, length, 2, 128), jnp.bfloat16, sharding=spec)
  loss = lambda q, k, v: (
    attn_api.attention(q, k, v, ids, impl="pallas_tpu", scale=0.1, platform="tpu")
    .astype(jnp.float32)
    .sum()
  )
  with jax.set_mesh(m):
    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(
      q, k, v
    )
  assert exported.mlir_module().count("tpu_custom_call") == 3
