"""neo_jax.model.attention_maps recomputes what the model itself computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.config import IMG_CONTEXT_TOKEN_ID as C
from neo_jax.config import IMG_END_TOKEN_ID as E
from neo_jax.config import IMG_START_TOKEN_ID as I
from neo_jax.config import tiny
from neo_jax.model import NeoModel, init_params
from neo_jax.model.attention_maps import (
  attention_call,
  attention_probs,
  layer_inputs,
  probabilities,
)
from neo_jax.ops.masks import AttnIds, dense_mask
from neo_jax.positions import grid_rc, native_rope_positions

LENGTH, N_VISUAL = 48, 12


def _row(rng: np.random.Generator, samples: list) -> tuple:
  """One packed row from samples of ("text", n) / ("image", h, w) / ("branch", b, n) parts."""
  ids, seg, branch, rc = [], [], [], []
  for s, parts in enumerate(samples, start=1):
    for part in parts:
      if part[0] == "image":
        toks, b = [I] + [C] * (part[1] * part[2]) + [E], 0
        rc.append(grid_rc(part[1], part[2]))
      elif part[0] == "branch":
        toks, b = list(rng.integers(10, 500, part[2])), part[1]
      else:
        toks, b = list(rng.integers(10, 500, part[1])), 0
      ids += toks
      seg += [s] * len(toks)
      branch += [b] * len(toks)
  pad = LENGTH - len(ids)
  rc = np.concatenate(rc + [np.zeros((N_VISUAL - sum(len(r) for r in rc), 2), np.int32)])
  return ids + [0] * pad, seg + [0] * pad, branch + [0] * pad, rc


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  rows = [
    _row(
      rng,
      [[("text", 3), ("image", 2, 3), ("text", 6)], [("text", 2), ("image", 1, 2), ("text", 8)]],
    ),
    _row(rng, [[("text", 4), ("image", 2, 2), ("text", 2), ("branch", 1, 6), ("branch", 2, 5)]]),
  ]
  ids, seg, branch, rc = (np.stack(x).astype(np.int32) for x in zip(*rows))
  positions = native_rope_positions(ids, seg, rc, branch, img_context_id=C, img_start_id=I)
  batch = dict(
    input_ids=ids,
    positions=positions,
    segment_ids=seg,
    branch_ids=branch,
    pixel_rc=rc,
    pixels=rng.integers(0, 256, (2, N_VISUAL, 4, 768), dtype=np.uint8),
  )
  config = tiny(num_hidden_layers=3, num_prebuffer_layers=1)
  params = init_params(config, jax.random.key(1))
  return config, params, batch


def test_layer_inputs_reproduce_the_model(setup):
  config, params, batch = setup
  hidden = layer_inputs(params, config, batch)
  assert len(hidden) == config.num_hidden_layers + 1
  model = NeoModel(config)
  walked = model.apply({"params": params}, hidden[-1], method=lambda m, x: m.logits(m.norm(x)))
  logits = model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()})
  real = np.asarray(batch["segment_ids"]) != 0
  np.testing.assert_allclose(
    np.asarray(walked)[real], np.asarray(logits)[real], rtol=1e-4, atol=1e-4
  )
  # each layer changes the state: a walk that skipped layers would not match above
  assert not np.allclose(hidden[0], hidden[1])


@pytest.mark.parametrize("layer", [0, 2])
def test_probabilities_give_the_layers_attention_output(setup, layer):
  config, params, batch = setup
  call = attention_call(params, config, batch, layer)
  probs = np.asarray(attention_probs(params, config, batch, layer))
  b, length = batch["input_ids"].shape
  assert probs.shape == (b, config.num_attention_heads, length, length)
  mask = np.asarray(dense_mask(call.q_ids, call.kv_ids))
  assert np.all(probs.transpose(0, 2, 3, 1)[~mask] == 0)  # [B, Q, K, H] at disallowed pairs
  sums = probs.sum(-1)
  valid = np.asarray(batch["segment_ids"]) != 0
  np.testing.assert_allclose(sums.transpose(0, 2, 1)[valid], 1.0, atol=1e-5)
  assert np.all(sums.transpose(0, 2, 1)[~valid] == 0)
  # probabilities times the values are the output the attention op produced in the model
  group = config.num_attention_heads // config.num_key_value_heads
  v = np.repeat(np.asarray(call.v), group, axis=2)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v)
  np.testing.assert_allclose(out[valid], np.asarray(call.output)[valid], rtol=1e-4, atol=1e-5)
  # the heads attend differently
  assert not np.allclose(probs[:, 0], probs[:, 1])


def test_probabilities_follow_the_mask_rule():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 5, 1, 8)), jnp.float32)
  ids = AttnIds(jnp.asarray([[1, 1, 1, 2, 0]]), jnp.zeros((1, 5), jnp.int32))
  probs = np.asarray(probabilities(q, k, ids, scale=0.5))
  assert probs[0, 0, 0, 0] == pytest.approx(1.0)  # the first token sees only itself
  assert np.all(probs[0, :, 3, :3] == 0) and probs[0, 0, 3, 3] == pytest.approx(1.0)
  assert np.all(probs[0, :, 4] == 0)  # padding attends to nothing
  scores = np.einsum("qd,kd->qk", np.asarray(q[0, :3, 1]), np.asarray(k[0, :3, 0])) * 0.5
  expected = np.exp(scores[2]) / np.exp(scores[2]).sum()
  np.testing.assert_allclose(probs[0, 1, 2, :3], expected, rtol=1e-5)


def test_layer_out_of_range(setup):
  config, params, batch = setup
  with pytest.raises(ValueError, match="layer 3"):
    attention_probs(params, config, batch, 3)
