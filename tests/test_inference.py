"""KV-cache generation against full recomputation: tokens and logits, single and batched prompts
with images, NEO's decoding positions, per-row stopping, chunking and compile reuse."""

import jax
import numpy as np
import pytest
from test_inference_support import prompts, random_model, recompute_logits

from neo_jax.inference.generation import batch_prompts, generate, prefill, prompt_arrays

MAX_NEW = 6
ATOL = 2e-4  # fp32 logits of magnitude ~5; caching only reorders sums


@pytest.fixture(scope="module")
def model():
  return random_model()


@pytest.fixture(scope="module")
def three(model):
  return prompts(model[1])


@pytest.fixture(scope="module")
def batched(model, three):
  params, config = model
  return generate(params, config, three, MAX_NEW, return_logits=True)


def check_against_recompute(params, config, prompt, tokens, logits):
  special = {config.img_context_token_id, config.img_start_token_id, config.img_end_token_id}
  assert not special & set(tokens), "a generated image token would change the position rule"
  expected = recompute_logits(params, config, prompt, tokens)
  np.testing.assert_allclose(logits[: len(tokens)], expected, atol=ATOL, rtol=0)
  assert expected.argmax(-1).tolist() == list(tokens)


def test_single_prompt_with_two_images_matches_recompute(model, three):
  params, config = model
  out = generate(params, config, [three[1]], MAX_NEW, return_logits=True)
  tokens = out.token_lists()[0]
  assert len(tokens) == MAX_NEW and not out.finished[0]
  assert len(set(tokens)) > 1
  check_against_recompute(params, config, three[1], tokens, out.logits[0])


def test_batched_rows_match_recompute(model, three, batched):
  """Rows of different lengths and image counts/sizes, left-padded into one batch."""
  params, config = model
  for r, prompt in enumerate(three):
    check_against_recompute(params, config, prompt, batched.token_lists()[r], batched.logits[r])


def test_batched_row_equals_row_alone(model, three, batched):
  params, config = model
  alone = generate(params, config, [three[1]], MAX_NEW, return_logits=True)
  assert alone.token_lists()[0] == batched.token_lists()[1]
  np.testing.assert_allclose(alone.logits[0], batched.logits[1], atol=ATOL, rtol=0)


def test_left_padding_layout(model, three):
  _, config = model
  batch = batch_prompts(three, config, batch_size=4, length_bucket=64, visual_bucket=8)
  n = [p["input_ids"].shape[1] for p in three]
  assert batch.input_ids.shape == (4, 64) and batch.positions.shape == (4, 3, 64)
  for r, p in enumerate(three):
    assert (batch.segment_ids[r, : 64 - n[r]] == 0).all()
    assert (batch.segment_ids[r, 64 - n[r] :] == 1).all()
    np.testing.assert_array_equal(batch.input_ids[r, 64 - n[r] :], p["input_ids"][0])
    np.testing.assert_array_equal(batch.positions[r, :, 64 - n[r] :], p["positions"][0])
    v = p["pixel_rc"].shape[1]
    np.testing.assert_array_equal(batch.pixel_rc[r, :v], p["pixel_rc"][0])
    assert not batch.pixels[r, v:].any()
  assert batch.pixels.shape[1] % 8 == 0 and batch.pixels.shape[1] >= max(
    p["pixel_rc"].shape[1] for p in three
  )
  assert batch.rows.tolist() == [True, True, True, False]
  assert (batch.segment_ids[3] == 0).all()


def test_decoding_positions_continue_from_max_prompt_t(model, three):
  """First new token: T = max prompt T + 1, H = W = 0, per row (docs/reference/neo.md#decoding)."""
  params, config = model
  batch = batch_prompts(three, config)
  state = prefill(
    params,
    prompt_arrays(batch),
    jax.random.key(0),
    config=config,
    cache_len=batch.input_ids.shape[1] + 2,
    max_new_tokens=2,
  )
  expected = [int(p["positions"][0, 0].max()) + 1 for p in three]
  assert np.asarray(state.next_t).tolist() == expected
  # images make T lag behind the token index: sum over images of (n_tokens - 1)
  n_ctx = [int((p["input_ids"] == config.img_context_token_id).sum()) for p in three]
  n_img = [p["input_ids"].tolist()[0].count(config.img_start_token_id) for p in three]
  assert expected == [p["input_ids"].shape[1] - (c - i) for p, c, i in zip(three, n_ctx, n_img)]
  assert int(state.cache.index) == batch.input_ids.shape[1]


def test_stop_token_per_row_and_chunked_batches(model, three, batched):
  """Each row stops at its own first stop token, the rest is padding; chunks of 2 rows (the
  last one with a filler row) give the same tokens as one batch of 3."""
  params, config = model
  full = batched.token_lists()
  stop = full[0][2]  # the third token of row 0
  out = generate(params, config, three, MAX_NEW, stop_ids=[stop], batch_size=2)
  assert out.tokens.shape == (3, MAX_NEW)
  for r in range(3):
    row = full[r]
    n = row.index(stop) + 1 if stop in row else MAX_NEW
    assert out.token_lists()[r] == row[:n]
    assert out.lengths[r] == n and out.finished[r] == (stop in row)
    assert (out.tokens[r, n:] == config.pad_token_id).all()
  assert out.finished[0] and out.lengths[0] <= 3


def test_prompts_in_one_bucket_share_one_compilation(model, three):
  params, config = model
  generate(params, config, [three[0]], 2)
  compiled = prefill._cache_size()
  # another length (44 vs 21 tokens) and image layout, same 64-token and 64-visual buckets
  generate(params, config, [three[1]], 2)
  assert prefill._cache_size() == compiled


def test_bad_prompts_are_rejected(model, three):
  params, config = model
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(params, config, three, 0)
  with pytest.raises(ValueError, match="visual tokens"):
    broken = dict(three[0], pixels=three[0]["pixels"][:, :1], pixel_rc=three[0]["pixel_rc"][:, :1])
    batch_prompts([broken], config)
  with pytest.raises(ValueError, match="do not fit"):
    batch_prompts(three, config, batch_size=2)


def test_generation_under_a_mesh_with_sharded_params(model, three, batched):
  """What the training loop's eval hook does: parameters split over (fsdp, tensor)."""

  from neo_jax.model import logical_axes
  from neo_jax.parallel.mesh import make_mesh
  from neo_jax.parallel.sharding import mesh_context, tree_shardings

  params, config = model
  mesh = make_mesh(data=1, fsdp=4, tensor=2)
  sharded = jax.device_put(params, tree_shardings(logical_axes(config), params, mesh))
  with mesh_context(mesh):
    out = generate(sharded, config, three, MAX_NEW, batch_size=4)
  assert out.token_lists() == batched.token_lists()
