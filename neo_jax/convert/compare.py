"""`neo-jax compare-logits`: a checkpoint's float32 logits against a golden .npz file.

The golden file holds the inputs and logits of the PyTorch model, in its own layout:
  input_ids     int [L]
  pixel_values  float32 [N_patches, 768]  16-px patches (c, py, px), row-major per image,
                                          images concatenated (may be [0, 768] for text only)
  grid_hw       int [n_images, 2]         each image's 16-px grid (h, w)
  logits        float32 [L, V]
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

import numpy as np

from neo_jax.config import ATTENTION_IMPLS, NeoConfig
from neo_jax.convert.hf_inputs import hf_inputs_to_batch
from neo_jax.errors import UserError

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
  import jax
  import jax.numpy as jnp
  from neo_jax.model import NeoModel
  model = NeoModel(config)
  inputs = {k: jnp.asarray(v) for k, v in batch.items()}
  forward = jax.jit(lambda p, x: model.apply({"params": p}, **x))
  with jax.default_matmul_precision("highest"):  # a parity check, not a speed run
    return np.asarray(forward(params, inputs))


def compare_logits(params: Mapping, config: NeoConfig,
                   golden: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Runs the model on the golden inputs; max abs difference and mean KL(golden || ours)."""
  batch = hf_inputs_to_batch(golden["input_ids"], golden["pixel_values"].astype(np.float32),
                             golden["grid_hw"], config)
  ours = model_logits(params, config, batch)[0]
  expected = np.asarray(golden["logits"], np.float32)
  if ours.shape != expected.shape:
    raise UserError(f"golden logits are {list(expected.shape)}, the model gives "
                    f"{list(ours.shape)} (vocab_size {config.vocab_size})")
  log_p, log_q = log_softmax64(expected), log_softmax64(ours)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  diff = np.abs(ours.astype(np.float64) - expected)
  return {"max_abs_diff": float(diff.max()), "mean_kl": float(kl.mean()),
          "argmax_agreement": float((ours.argmax(-1) == expected.argmax(-1)).mean()),
          "positions": int(expected.shape[0]), "worst_position": int(diff.max(-1).argmax())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True, metavar="DIR",
                      help="HF NEO directory (config.json + safetensors) or neo-jax parameter "
                           "directory (config.json + params/); loaded in float32")
  parser.add_argument("--golden", required=True, metavar="FILE.npz",
                      help="golden file with input_ids [L], pixel_values [N_patches, 768], "
                           "grid_hw [n_images, 2] and logits [L, V] from the PyTorch model")
  parser.add_argument("--atol", type=float, default=1e-4,
                      help="largest allowed absolute logit difference (default: %(default)g); "
                           "exit status 0 within it, 1 above it")
  parser.add_argument("--attention-impl", default="xla", choices=ATTENTION_IMPLS, metavar="NAME",
                      help=f"attention implementation to check, one of "
                           f"{', '.join(ATTENTION_IMPLS)} (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
  from neo_jax.convert.loading import load_checkpoint
  golden = read_golden(args.golden)
  params, config = load_checkpoint(args.checkpoint, dtype="float32", param_dtype="float32",
                                   attention_impl=args.attention_impl)
  result = compare_logits(params, config, golden)
  ok = result["max_abs_diff"] <= args.atol
  print(f"{os.path.basename(args.golden)}: max |logit diff| = {result['max_abs_diff']:.3e} "
        f"(atol {args.atol:g}, worst position {result['worst_position']}), "
        f"mean KL(golden || ours) = {result['mean_kl']:.3e}, argmax agreement "
        f"{result['argmax_agreement']:.1%} over {result['positions']} positions: "
        f"{'OK' if ok else 'FAIL'}")
  return 0 if ok else 1
