"""The attention entry point: impl selection, kernels behind it, cross-attention fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.ops import attention as attn_api
from neo_jax.ops import reference
from neo_jax.ops.layouts import ids_from_arrays
from neo_jax.ops.masks import AttnIds
from test_attention_kernels import LAYOUT, make_inputs, rel_err


def test_auto_picks_per_backend():
  assert attn_api.resolve("auto", "cpu") == "xla_flash"
  assert attn_api.resolve("auto", "tpu") == "pallas_tpu"
  assert attn_api.resolve("auto", "gpu") == "pallas_gpu"
  assert set(attn_api.available()) >= {"xla", "xla_chunked", "xla_flash", "pallas_tpu",
                                       "pallas_gpu", "auto"}
  with pytest.raises(ValueError, match="not available"):
    attn_api.resolve("flash")


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "auto"])
def test_entry_point_self_and_cross_attention(impl):
  q, k, v, _, ids = make_inputs(5, 2, 96, 4, 2, 32, 16, jnp.float32, **LAYOUT)
  want = reference.attention_dense(q, k, v, ids, scale=0.2)
  got = jax.jit(lambda q, k, v, ids: attn_api.attention(q, k, v, ids, impl=impl, scale=0.2,
                                                         q_chunk=32))(q, k, v, ids)
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
