"""Packing: budgets, loss weights, NEO's positions per segment (docs/reference/neo.md#index-rule),
the mask rule (docs/architecture.md#the-attention-rule) on random packings, text splitting,
preference rows, exact state restore."""

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.config import IMG_CONTEXT_TOKEN_ID as CTX
from neo_jax.config import IMG_END_TOKEN_ID as END
from neo_jax.config import IMG_START_TOKEN_ID as START
from neo_jax.config import PAD_TOKEN_ID as PAD
from neo_jax.data.encode import skip
from neo_jax.data.packing import STATS_KEY, PackedBatchIterDataset, PackingConfig
from neo_jax.data.stats import STAT_INDEX, DataError
from neo_jax.ops.masks import dense_mask, self_attention_ids
from neo_jax.positions import image_ids


def make_sample(rng, n_images=None, preference=False, text_only=False):
  """A random sample plus its ground truth: per-token image number and each image's grid."""
  ids, sup, image_no, grids, branch = [], [], [], [], []

  def text(n, supervised, b=0):
    ids.extend(rng.integers(10, 1000, n).tolist())
    sup.extend([supervised] * n)
    image_no.extend([0] * n)
    branch.extend([b] * n)

  text(int(rng.integers(1, 6)), False)
  for _ in range(0 if text_only else int(rng.integers(0, 3) if n_images is None else n_images)):
    h, w = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    grids.append((h, w))
    ids.extend([START] + [CTX] * (h * w) + [END])
    sup.extend([False] * (h * w + 2))
    image_no.extend([0] + [len(grids)] * (h * w) + [0])
    branch.extend([0] * (h * w + 2))
    text(int(rng.integers(0, 4)), False)
  if preference:
    text(int(rng.integers(1, 4)), True, 1)
    text(int(rng.integers(1, 4)), True, 2)
  else:
    n = int(rng.integers(1, 8))
    text(n, bool(rng.integers(0, 2)))
    text(int(rng.integers(1, 5)), True)
  v = sum(h * w for h, w in grids)
  pixels = rng.integers(0, 256, (v, 4, 768), dtype=np.uint8)
  rc = (
    np.concatenate([np.stack(np.divmod(np.arange(h * w), w), -1) for h, w in grids])
    if grids
    else np.zeros((0, 2), np.int64)
  ).astype(np.int32)
  sample = {
    "input_ids": np.asarray(ids, np.int32),
    "supervised": np.asarray(sup, bool),
    "pixels": pixels,
    "pixel_rc": rc,
    "splittable": np.asarray(text_only),
  }
  if preference:
    sample["branch_ids"] = np.asarray(branch, np.int32)
  truth = {"image_no": np.asarray(image_no), "grids": grids}
  return sample, truth


def pack_all(samples, cfg):
  it = iter(PackedBatchIterDataset(grain.MapDataset.source(samples).to_iter_dataset(), cfg))
  return list(it)


def spec_positions(ids, grids):
  """docs/reference/neo.md#index-rule for one sample, written out token by token."""
  t, out_t, out_h, out_w = -1, [], [], []
  image, k = -1, 0
  for i, x in enumerate(ids):
    s = 1 if i > 0 and ids[i - 1] == START else 0
    n = 0 if x == CTX else 1
    t += s + n
    out_t.append(t)
    if x == CTX:
      if i > 0 and ids[i - 1] == START:
        image, k = image + 1, 0
      w = grids[image][1]
      out_h.append(k // w)
      out_w.append(k % w)
      k += 1
    else:
      out_h.append(0)
      out_w.append(0)
  return np.asarray([out_t, out_h, out_w])


def cfg_for(**kw):
  base = dict(
    batch_size=3, seq_len=64, visual_budget=24, img_context_id=CTX, img_start_id=START, pad_id=PAD
  )
  base.update(kw)
  return PackingConfig(**base)


def segments_of(batch, r):
  seg = batch["segment_ids"][r]
  return [np.nonzero(seg == s)[0] for s in range(1, seg.max() + 1)]


def test_budgets_order_weights_and_positions():
  rng = np.random.default_rng(0)
  pairs = [make_sample(rng) for _ in range(60)]
  cfg = cfg_for(loss_token_budget=12)
  batches = pack_all([s for s, _ in pairs], cfg)
  placed, per_batch = [], []
  for batch in batches:
    per_batch.append([])
    stats = batch.pop(STATS_KEY)
    shapes = cfg.batch_shapes()
    assert set(batch) == set(shapes)
    for key, (shape, dtype) in shapes.items():
      assert batch[key].shape == shape and batch[key].dtype == dtype, key
    for r in range(cfg.batch_size):
      assert (batch["segment_ids"][r] > 0).sum() <= cfg.seq_len
      assert (batch["input_ids"][r] == CTX).sum() <= cfg.visual_budget
      assert (batch["loss_weights"][r] > 0).sum() <= 12
      v = 0
      row_order = []
      for idx in segments_of(batch, r):
        ids = batch["input_ids"][r, idx]
        match = [
          j
          for j, (s, _) in enumerate(pairs)
          if len(s["input_ids"]) == len(idx) and np.array_equal(s["input_ids"], ids)
        ]
        assert match, "packed segment is not one of the samples"
        sample, truth = pairs[match[0]]
        placed.append(match[0])
        row_order.append(match[0])
        per_batch[-1].append(match[0])
        # positions: docs/reference/neo.md#index-rule per sample, independently of packing
        np.testing.assert_array_equal(
          batch["positions"][r][:, idx], spec_positions(sample["input_ids"], truth["grids"])
        )
        # pixels and their grid coordinates travel with the sample, in order
        nv = len(sample["pixels"])
        np.testing.assert_array_equal(batch["pixels"][r, v : v + nv], sample["pixels"])
        np.testing.assert_array_equal(batch["pixel_rc"][r, v : v + nv], sample["pixel_rc"])
        v += nv
        # targets / square weights: position i predicts token i + 1 of the same sample
        sup_next = sample["supervised"][1:]
        w = batch["loss_weights"][r, idx]
        np.testing.assert_allclose(w[:-1], np.where(sup_next, 1 / np.sqrt(sup_next.sum()), 0))
        assert w[-1] == 0
        np.testing.assert_array_equal(batch["targets"][r, idx[:-1]], ids[1:])
      assert not batch["pixels"][r, v:].any()
      assert row_order == sorted(row_order)  # a row keeps the stream order
    assert stats[STAT_INDEX["samples"]] == sum(len(segments_of(batch, r)) for r in range(3))
  dropped = [
    j
    for j, (s, _) in enumerate(pairs)
    if len(s["input_ids"]) > 64 or len(s["pixels"]) > 24 or s["supervised"][1:].sum() > 12
  ]
  assert sorted(placed + dropped) == list(range(len(pairs)))  # nothing lost, nothing twice
  for earlier, later in zip(per_batch, per_batch[1:]):  # batches follow the stream order
    assert max(earlier) < min(later)


def test_token_reduction_and_drop_counts():
  rng = np.random.default_rng(1)
  good, _ = make_sample(rng, n_images=1)
  long_text = {
    **good,
    "input_ids": np.full(100, 7, np.int32),
    "supervised": np.ones(100, bool),
    "pixels": good["pixels"][:0],
    "pixel_rc": good["pixel_rc"][:0],
  }
  many_visual = {**good, "pixels": np.zeros((30, 4, 768), np.uint8)}
  cfg = cfg_for(loss_reduction="token", loss_token_budget=40)
  too_many_loss = {
    **long_text,
    "input_ids": long_text["input_ids"][:60],
    "supervised": long_text["supervised"][:60],
  }
  batches = pack_all(
    [good, long_text, skip("corrupt_image"), many_visual, too_many_loss, good], cfg
  )
  stats = sum(b.pop(STATS_KEY) for b in batches)
  assert stats[STAT_INDEX["dropped/too_many_tokens"]] == 1
  assert stats[STAT_INDEX["dropped/too_many_visual_tokens"]] == 1
  assert stats[STAT_INDEX["dropped/too_many_loss_tokens"]] == 1
  assert stats[STAT_INDEX["skipped/corrupt_image"]] == 1
  assert stats[STAT_INDEX["samples"]] == 2
  w = batches[0]["loss_weights"]
  assert set(np.unique(w)) == {0.0, 1.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_from_batch_ids_equals_direct_rule(seed):
  rng = np.random.default_rng(100 + seed)
  preference = seed == 2
  pairs = [make_sample(rng, preference=preference) for _ in range(40)]
  cfg = cfg_for(preference=preference, seq_len=48, visual_budget=16)
  for batch in pack_all([s for s, _ in pairs], cfg):
    batch.pop(STATS_KEY)
    img = image_ids(batch["input_ids"], batch["positions"][:, 0], CTX)
    branch = batch.get("branch_ids")
    got = np.asarray(
      dense_mask(
        self_attention_ids(
          jnp.asarray(batch["segment_ids"]),
          jnp.asarray(img),
          None if branch is None else jnp.asarray(branch),
        )
      )
    )
    for r in range(cfg.batch_size):
      expected = np.zeros((cfg.seq_len, cfg.seq_len), bool)
      for idx in segments_of(batch, r):
        ids = batch["input_ids"][r, idx]
        sample, truth = next(
          (s, t)
          for s, t in pairs
          if len(s["input_ids"]) == len(idx) and np.array_equal(s["input_ids"], ids)
        )
        b = sample.get("branch_ids", np.zeros(len(idx), np.int32))
        im = truth["image_no"]
        for q in range(len(idx)):
          for k in range(len(idx)):
            visible = b[k] == 0 or b[k] == b[q]
            causal_or_image = k <= q or (im[q] != 0 and im[q] == im[k])
            expected[idx[q], idx[k]] = visible and causal_or_image
      np.testing.assert_array_equal(got[r], expected)


def test_preference_rows():
  rng = np.random.default_rng(3)
  pairs = [make_sample(rng, preference=True) for _ in range(20)]
  cfg = cfg_for(preference=True, seq_len=80, loss_token_budget=20)
  for batch in pack_all([s for s, _ in pairs], cfg):
    batch.pop(STATS_KEY)
    for r in range(cfg.batch_size):
      assert (batch["gather_weights"][r] > 0).sum() <= 20
      for seg_no, idx in enumerate(segments_of(batch, r), start=1):
        ids, br = batch["input_ids"][r, idx], batch["branch_ids"][r, idx]
        sample, truth = next((s, t) for s, t in pairs if np.array_equal(s["input_ids"], ids))
        np.testing.assert_array_equal(br, sample["branch_ids"])
        n_prompt = int((br == 0).sum())
        # rejected restarts T where chosen started: T of prompt + rejected alone
        rej = np.concatenate([np.arange(n_prompt), np.nonzero(br == 2)[0]])
        np.testing.assert_array_equal(
          batch["positions"][r][:, idx[rej]], spec_positions(ids[rej], truth["grids"])
        )
        # the gathered response tokens: targets, branches, predicting positions
        g = batch["gather_segment"][r] == seg_no
        resp = np.nonzero(br > 0)[0]
        np.testing.assert_array_equal(batch["gather_targets"][r][g], ids[resp])
        np.testing.assert_array_equal(batch["gather_branch"][r][g], br[resp])
        pred = batch["gather_index"][r][g] - idx[0]
        first_rej = resp[br[resp] == 2][0]
        expected_pred = np.where(resp == first_rej, n_prompt - 1, resp - 1)
        np.testing.assert_array_equal(pred, expected_pred)
        # dense loss weights: the chosen response only (square reduction)
        n_chosen = int((br == 1).sum())
        w = batch["loss_weights"][r, idx]
        np.testing.assert_allclose(w[n_prompt - 1 : n_prompt - 1 + n_chosen], 1 / np.sqrt(n_chosen))
        assert w.sum() == pytest.approx(np.sqrt(n_chosen))


def test_text_is_split_across_rows_and_resume_inside_a_split_sample():
  text = {
    "input_ids": np.arange(1000, 1150, dtype=np.int32),
    "supervised": np.ones(150, bool),
    "pixels": np.zeros((0, 4, 768), np.uint8),
    "pixel_rc": np.zeros((0, 2), np.int32),
    "splittable": np.asarray(True),
  }
  cfg = cfg_for(batch_size=1, seq_len=40, loss_token_budget=30)
  ds = PackedBatchIterDataset(grain.MapDataset.source([text, text]).to_iter_dataset(), cfg)
  batches = list(iter(ds))
  pieces = []
  for batch in batches:
    batch.pop(STATS_KEY)
    idx = np.nonzero(batch["segment_ids"][0])[0]
    pieces.append(batch["input_ids"][0, idx])
    assert (batch["loss_weights"][0] > 0).sum() <= 30
  # consecutive pieces overlap by one token; together they give both texts back, and each
  # token after the first of a text is predicted exactly once
  first = [p for p in pieces]
  rebuilt = [first[0]]
  for p in first[1:]:
    if p[0] == rebuilt[-1][-1]:
      rebuilt[-1] = np.concatenate([rebuilt[-1], p[1:]])
    else:
      rebuilt.append(p)
  assert len(rebuilt) == 2
  for r in rebuilt:
    np.testing.assert_array_equal(r, text["input_ids"])
  # restore in the middle of the first text
  it = iter(ds)
  next(it)
  state = it.get_state()
  assert state["offset"] > 0
  expected = [next(it) for _ in range(3)]
  again = iter(ds)
  again.set_state(state)
  for e in expected:
    got = next(again)
    for key in e:
      np.testing.assert_array_equal(got[key], e[key], err_msg=key)


def test_endless_bad_stream_raises_instead_of_hanging():
  cfg = cfg_for(max_consecutive_bad=50)
  endless = grain.MapDataset.source([skip("wrong_kind")]).repeat()
  with pytest.raises(DataError, match="no usable sample"):
    next(iter(PackedBatchIterDataset(endless.to_iter_dataset(), cfg)))
