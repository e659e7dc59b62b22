"""A checkpoint's float32 logits against a golden .npz file (`neo-jax compare-logits`).

The golden file holds the inputs and logits of the PyTorch model, in its own layout:
  input_ids     int [L]
  pixel_values  float32 [N_patches, 768]  16-px patches (c, py, px), row-major per image,
                                          images concatenated (may be [0, 768] for text only)
  grid_hw       int [n_images, 2]         each image's 16-px grid (h, w)
  logits        float32 [L, V]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.convert.hf_inputs import hf_inputs_to_batch
from neo_jax.errors import UserError
from neo_jax.model import NeoModel

GOLDEN_KEYS = ("input_ids", "pixel_values", "grid_hw", "logits")


def read_golden(path: str) -> dict[str, np.ndarray]:
  """Loads a golden .npz (no pickle) and checks that it holds every key."""
  try:
    with np.load(path, allow_pickle=False) as data:
      golden = {k: data[k] for k in data.files}
  except FileNotFoundError:
    raise UserError(f"{path}: golden file not found") from None
  except (ValueError, OSError, EOFError) as e:
    raise UserError(f"{path}: not a readable .npz file ({e})") from None
  missing = [k for k in GOLDEN_KEYS if k not in golden]
  if missing:
    raise UserError(f"{path}: golden file lacks {missing} (holds {sorted(golden)})")
  return golden


def log_softmax64(logits: np.ndarray) -> np.ndarray:
  x = logits.astype(np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def model_logits(params: Mapping, config: NeoConfig, batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """float32 logits [B, L, V] of one forward pass."""
  model = NeoModel(config)
  inputs = {k: jnp.asarray(v) for k, v in batch.items()}
  forward = jax.jit(lambda p, x: model.apply({"params": p}, **x))
  with jax.default_matmul_precision("highest"):  # a parity check, not a speed run
    return np.asarray(forward(params, inputs))


def compare_logits(
  params: Mapping, config: NeoConfig, golden: Mapping[str, np.ndarray]
) -> dict[str, Any]:
  """Runs the model on the golden inputs; max abs difference and mean KL(golden || ours)."""
  batch = hf_inputs_to_batch(
    golden["input_ids"], golden["pixel_values"].astype(np.float32), golden["grid_hw"], config
  )
  ours = model_logits(params, config, batch)[0]
  expected = np.asarray(golden["logits"], np.float32)
  if ours.shape != expected.shape:
    raise UserError(
      f"golden logits are {list(expected.shape)}, the model gives "
      f"{list(ours.shape)} (vocab_size {config.vocab_size})"
    )
  log_p, log_q = log_softmax64(expected), log_softmax64(ours)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  diff = np.abs(ours.astype(np.float64) - expected)
  return {
    "max_abs_diff": float(diff.max()),
    "mean_kl": float(kl.mean()),
    "argmax_agreement": float((ours.argmax(-1) == expected.argmax(-1)).mean()),
    "positions": int(expected.shape[0]),
    "worst_position": int(diff.max(-1).argmax()),
  }
