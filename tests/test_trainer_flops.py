"""The FLOP model: exact attention density (the mask rule of ops/masks.py), stage-aware
backward, the peak table."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.config import tiny
from neo_jax.data.synthetic import SyntheticSpec, compact_vocab, synthetic_batch
from neo_jax.ops.masks import AttnIds, dense_mask
from neo_jax.positions import image_ids
from neo_jax.trainer import flops as M
from neo_jax.trainer import optimizer as O

CFG = compact_vocab(tiny(), 512)


def _dense_pairs(seg, img, branch=None):
  ids = AttnIds(
    jnp.asarray(seg), jnp.asarray(img), None if branch is None else jnp.asarray(branch), None
  )
  return np.asarray(dense_mask(ids).sum(axis=(1, 2)))


def test_attention_pairs_equal_the_dense_mask_on_packed_rows():
  spec = SyntheticSpec.for_model(CFG, batch_size=6, seq_len=96, visual_tokens=40)
  batch = synthetic_batch(spec, 3)
  img = image_ids(batch["input_ids"], batch["positions"][:, 0], CFG.img_context_token_id)
  got = M.attention_pairs(batch["segment_ids"], img)
  np.testing.assert_array_equal(got, _dense_pairs(batch["segment_ids"], img))
  assert (got < 96 * 97 // 2).all()


def test_attention_pairs_with_preference_branches():
  rng = np.random.default_rng(0)
  rows_seg, rows_img, rows_br = [], [], []
  for _ in range(8):
    seg, img, br = [], [], []
    s = 0
    while len(seg) < 60:
      s += 1
      prompt = int(rng.integers(2, 8))
      has_image = rng.random() < 0.7
      n_img = int(rng.integers(1, 5)) if has_image else 0
      seg += [s] * (prompt + n_img)
      img += [0] * prompt + [7] * n_img
      br += [0] * (prompt + n_img)
      for b in (1, 2):
        n = int(rng.integers(1, 6))
        seg += [s] * n
        img += [0] * n
        br += [b] * n
    pad = 64 - len(seg)
    rows_seg.append((seg + [0] * pad)[:64] if pad >= 0 else seg[:64])
    rows_img.append((img + [0] * pad)[:64] if pad >= 0 else img[:64])
    rows_br.append((br + [0] * pad)[:64] if pad >= 0 else br[:64])
  seg, img, br = (np.asarray(x, np.int32) for x in (rows_seg, rows_img, rows_br))
  np.testing.assert_array_equal(M.attention_pairs(seg, img, br), _dense_pairs(seg, img, br))


def test_step_flops_by_hand_for_one_text_sample():
  n, L = 10, 16
  batch = {
    "input_ids": np.full((1, L), 5, np.int32),
    "segment_ids": np.asarray([[1] * n + [0] * (L - n)], np.int32),
    "positions": np.zeros((1, 3, L), np.int32),
  }
  c = CFG
  d, f, h, kv, hd = (
    c.hidden_size,
    c.intermediate_size,
    c.num_attention_heads,
    c.num_key_value_heads,
    c.head_dim,
  )
  per_token_layer = 2 * (d * hd * (3 * h + 3 * kv) + 3 * d * f)
  layers = per_token_layer * n * c.num_hidden_layers
  attention = 2 * (2 * hd + hd) * h * (n * (n + 1) // 2) * c.num_hidden_layers
  head = 2 * d * c.vocab_size * 4  # K = 4 loss positions per row
  out = M.step_flops(c, batch, trainable=None, loss_positions_per_row=4)
  assert out["forward"] == pytest.approx(layers + attention + head)
  assert out["backward"] == pytest.approx(2 * out["forward"])  # all trainable, no vision
  assert out["attention_density"] == pytest.approx(55 / (16 * 17 / 2))


def test_frozen_parameters_get_no_weight_gradient_flops():
  spec = SyntheticSpec.for_model(CFG, batch_size=2, seq_len=64, visual_tokens=16)
  batch = synthetic_batch(spec, 0)
  everything = M.step_flops(CFG, batch, None)
  from neo_jax.model import abstract_params

  pretrain = O.trainable_paths(abstract_params(CFG), O.stage_patterns("pretrain"))
  frozen = M.step_flops(CFG, batch, pretrain)
  assert frozen["forward"] == everything["forward"]
  # the difference is exactly the weight gradients of the frozen LLM matmuls and the head
  c, tokens = CFG, frozen["tokens"]
  d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
  llm = (
    2
    * tokens
    * c.num_llm_layers
    * (d * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 3 * d * f)
  )
  head = 2 * d * c.vocab_size * batch["input_ids"].size
  assert everything["backward"] - frozen["backward"] == pytest.approx(llm + head)
  assert frozen["visual_tokens"] == (batch["input_ids"] == CFG.img_context_token_id).sum()


def test_six_n_is_close_for_long_text_without_attention():
  big = tiny(vocab_size=1000)
  n = 2048
  batch = {
    "input_ids": np.full((1, n), 5, np.int32),
    "segment_ids": np.ones((1, n), np.int32),
    "positions": np.zeros((1, 3, n), np.int32),
  }
  out = M.step_flops(big, batch)
  attn = (
    3
    * 2
    * (big.qk_head_dim + big.head_dim)
    * big.num_attention_heads
    * (n * (n + 1) / 2)
    * big.num_hidden_layers
  )
  assert (out["total"] - attn) / n == pytest.approx(M.params_flops_per_token(big), rel=1e-6)


def test_peak_flops_table():
  assert M.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert M.peak_flops_per_device("TPU v5 lite") == 197e12
  assert M.peak_flops_per_device("TPU v5p") == 459e12
  assert M.peak_flops_per_device("cpu") is None
  json.dumps(M.PEAK_FLOPS)
