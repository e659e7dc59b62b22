"""The NEO model gives the same logits (and parameter gradients) with every attention impl."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.config import IMG_CONTEXT_TOKEN_ID as C
from neo_jax.config import IMG_END_TOKEN_ID as E
from neo_jax.config import IMG_START_TOKEN_ID as I
from neo_jax.config import tiny
from neo_jax.model import NeoModel, init_params
from neo_jax.positions import grid_rc, native_rope_positions

IMPLS = ["xla", "xla_chunked", "xla_flash", "pallas_tpu", "pallas_gpu", "auto"]
LENGTH, N_VISUAL = 64, 24


def packed_row(rng, samples):
  """Token ids, segment ids, branch ids and visual (row, col) of one packed row.

  samples: list of lists of ("text", n) / ("image", h, w) / ("branch", b, n) parts.
  """
  ids, seg, branch, rc = [], [], [], []
  for s, parts in enumerate(samples, start=1):
    for part in parts:
      if part[0] == "image":
        _, h, w = part
        toks = [I] + [C] * (h * w) + [E]
        rc.append(grid_rc(h, w))
        b = 0
      elif part[0] == "branch":
        _, b, n = part
        toks = list(rng.integers(10, 500, n))
      else:
        toks, b = list(rng.integers(10, 500, part[1])), 0
      ids += toks
      seg += [s] * len(toks)
      branch += [b] * len(toks)
  pad = LENGTH - len(ids)
  rc = np.concatenate(rc) if rc else np.zeros((0, 2), np.int32)
  rc = np.concatenate([rc, np.zeros((N_VISUAL - len(rc), 2), np.int32)])
  return ids + [0] * pad, seg + [0] * pad, branch + [0] * pad, rc


def batch():
  rng = np.random.default_rng(0)
  rows = [
    # two packed samples, one with two images (adjacent to text), then padding
    packed_row(
      rng,
      [
        [("text", 3), ("image", 2, 3), ("text", 4), ("image", 1, 2), ("text", 5)],
        [("text", 2), ("image", 2, 2), ("text", 9)],
      ],
    ),
    # a preference sample: prompt with an image, chosen, rejected; then a plain sample
    packed_row(
      rng,
      [
        [("text", 4), ("image", 3, 2), ("text", 2), ("branch", 1, 7), ("branch", 2, 6)],
        [("text", 5), ("image", 2, 2), ("text", 6)],
      ],
    ),
  ]
  ids, seg, branch, rc = (np.stack(x).astype(np.int32) for x in zip(*rows))
  positions = native_rope_positions(ids, seg, rc, branch, img_context_id=C, img_start_id=I)
  pixels = rng.integers(0, 256, (2, N_VISUAL, 4, 768), dtype=np.uint8)
  return dict(
    input_ids=jnp.asarray(ids),
    positions=jnp.asarray(positions),
    segment_ids=jnp.asarray(seg),
    pixels=jnp.asarray(pixels),
    pixel_rc=jnp.asarray(rc),
    branch_ids=jnp.asarray(branch),
  )


@pytest.fixture(scope="module")
def setup():
  config = tiny(attention_q_chunk=16)
  params = init_params(config, jax.random.key(0))
  return config, params, batch()


def logits_and_grads(config, params, inputs):
  model = NeoModel(config)
  weights = (inputs["segment_ids"] != 0).astype(jnp.float32)[..., None]

  def loss(params):
    logits = model.apply({"params": params}, **inputs)
    return jnp.sum(jax.nn.log_softmax(logits) * weights) / 1000.0, logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def _forward(config, inputs):
  """params -> logits of NeoModel(config) on `inputs`."""
  return lambda p: NeoModel(config).apply({"params": p}, **inputs)


def test_logits_and_gradients_equal_across_impls(setup):
  config, params, inputs = setup
  assert int((inputs["input_ids"] == C).sum()) > 0 and int(inputs["segment_ids"].max()) == 2
  want_logits, want_grads = logits_and_grads(config, params, inputs)
  scale = float(jnp.abs(want_logits).max())
  for impl in IMPLS[1:]:
    cfg = config.replace(attention_impl=impl)
    forward = _forward(cfg, inputs)
    jaxpr = str(jax.make_jaxpr(forward)(params))
    assert ("pallas_call" in jaxpr) == impl.startswith("pallas"), impl  # the kernel really runs
    if not impl.startswith("pallas"):  # the other references: logits only
      logits = jax.jit(forward)(params)
      grads = want_grads
    else:
      logits, grads = logits_and_grads(cfg, params, inputs)
    err = float(jnp.abs(logits - want_logits).max()) / scale
    assert err <= 1e-5, (impl, err)
    for (path, g), w in zip(
      jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)
    ):
      gerr = float(jnp.abs(g - w).max()) / max(float(jnp.abs(w).max()), 1e-30)
      assert gerr <= 1e-4, (impl, jax.tree_util.keystr(path), gerr)
