"""The cudnn implementation (text-only packed rows): its packed layout, the same call emulated
with XLA on CPU against the reference (values and gradients), the per-row precondition guard,
the entry point under a mesh, and the cuDNN call lowering for CUDA. Whether cuDNN reads the
offsets and lengths as the emulation does is checked on a GPU by `make device-check`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as fas
from test_attention_kernels import TOL, check_against_reference, make_inputs, rel_err
from test_attention_sharded import mesh, reference_values, run_sharded

from neo_jax.config import ATTENTION_IMPLS
from neo_jax.ops import attention as attn_api
from neo_jax.ops import cudnn, masks
from neo_jax.ops.layouts import ids_from_arrays


def text_rows(lengths_per_row, length):
  """Segment ids of text-only rows: runs of the given lengths (0 = a gap of padding)."""
  seg = np.zeros((len(lengths_per_row), length), np.int32)
  for r, runs in enumerate(lengths_per_row):
    pos, sid = 0, 0
    for n in runs:
      if n > 0:
        sid += 1
        seg[r, pos : pos + n] = sid
      pos += abs(n)
  return ids_from_arrays(seg, np.zeros_like(seg), np.zeros_like(seg))


ROWS = [[30, 50, -4, 20, 1, 9], [96], [7, 7, 7, -40, 3], [-5, 60, -10]]  # one row each, L = 120


def test_packed_layout_worked_example():
  ids = text_rows([[3, 2, -2, 3, -1]], 11)  # 1 1 1 2 2 0 0 3 3 3 0
  layout = cudnn.packed_layout(ids, 4)
  np.testing.assert_array_equal(layout.offsets, [[0, 3, 7, -1, -1]])
  np.testing.assert_array_equal(layout.seqlens, [[3, 2, 3, -1]])
  assert int(layout.count[0]) == 3 and bool(layout.ok[0])
  # the mask of these offsets and lengths is the rule of the ids
  np.testing.assert_array_equal(
    cudnn.layout_mask(layout.offsets, layout.seqlens, 11), masks.dense_mask(ids)
  )


def test_layout_mask_is_the_rule_on_text_rows():
  ids = text_rows(ROWS, 120)
  layout = cudnn.packed_layout(ids, 8)
  np.testing.assert_array_equal(
    cudnn.layout_mask(layout.offsets, layout.seqlens, 120), masks.dense_mask(ids)
  )


@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
def test_emulated_call_matches_the_reference(hq, hkv):
  # bf16 (what cuDNN takes), query/key width 64 != value width 32, padding inside and after
  ids = text_rows(ROWS, 120)
  q, k, v, d_out, _ = make_inputs(1, 4, 120, hq, hkv, 64, 32, jnp.bfloat16)
  fn = lambda q, k, v, ids, scale: cudnn.attention(
    q, k, v, ids, scale=scale, max_segments=8, emulate=True
  )
  out, (dq, dk, dv) = check_against_reference(fn, q, k, v, d_out, ids, 0.125, TOL[jnp.bfloat16])
  pad = np.asarray(ids.segment_ids) == 0
  for x in (out, dq, dk, dv):
    assert (np.asarray(x, np.float32)[pad] == 0).all()


def test_rows_that_break_the_preconditions_are_nan():
  ids = text_rows([[30, 30], [10, 10, 10, 10], [60]], 60)
  image = np.zeros((3, 60), np.int32)
  image[2, 5:15] = 1  # an image in row 2
  ids = ids._replace(image_ids=jnp.asarray(image))
  q, k, v, _, _ = make_inputs(2, 3, 60, 2, 1, 16, 16, jnp.bfloat16)
  out = cudnn.attention(q, k, v, ids, scale=0.25, max_segments=3, emulate=True)
  finite = np.isfinite(np.asarray(out, np.float32)).reshape(3, -1)
  assert finite[0].all()
  assert not finite[1].any()  # 4 segments > max_segments
  assert not finite[2].any()  # an image
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    cudnn.attention(q.astype(jnp.float32), k, v, ids, scale=0.25)


def test_entry_point_and_config():
  assert set(ATTENTION_IMPLS) == set(attn_api.available())
  assert attn_api.resolve("auto", "gpu") != "cudnn"
  ids = text_rows(ROWS, 120)
  q, k, v, d_out, _ = make_inputs(3, 4, 120, 4, 2, 32, 32, jnp.bfloat16)
  got = attn_api.attention(q, k, v, ids, impl="cudnn", scale=0.2)
  f32 = lambda x: x.astype(jnp.float32)
  want = attn_api.attention(f32(q), f32(k), f32(v), ids, impl="xla", scale=0.2)
  assert rel_err(got, want) <= TOL[jnp.bfloat16]
  # under a mesh: batch over data x fsdp, heads over tensor, one shard_map
  (out, grads), jaxpr = run_sharded(mesh(2, 2, 2), "cudnn", q, k, v, d_out, ids)
  assert "shard_map" in jaxpr
  want_out, want_grads = reference_values(f32(q), f32(k), f32(v), f32(d_out), ids)
  assert rel_err(out, want_out) <= TOL[jnp.bfloat16]
  for g, w in zip(grads, want_grads):
    assert rel_err(g, w) <= TOL[jnp.bfloat16]


def test_cudnn_call_lowers_for_cuda(monkeypatch):
  # jax asks the local GPU for its cuDNN version and compute capability while tracing; on CPU
  # they are set to an H200's (cuDNN 9.19, sm_90) so the call itself lowers: NEO's widths, GQA
  # and the packed layout reach cuDNN's forward and backward custom calls
  monkeypatch.setattr(fas, "check_cudnn_version", lambda: 91900)
  monkeypatch.setattr(fas, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(fas, "is_cuda_compute_capability_equal", lambda capability: False)
  ids = text_rows(ROWS, 128)
  q = jnp.zeros((4, 128, 4, 256), jnp.bfloat16)
  k = jnp.zeros((4, 128, 2, 256), jnp.bfloat16)
  v = jnp.zeros((4, 128, 2, 128), jnp.bfloat16)
  fwd = lambda q, k, v: cudnn.attention(
    q, k, v, ids, scale=128**-0.5, max_segments=8, emulate=False
  )
  bwd = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  text = jax.jit(bwd).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
  assert "@__cudnn$fmhaSoftmax(" in text and "@__cudnn$fmhaSoftmaxBackward(" in text
