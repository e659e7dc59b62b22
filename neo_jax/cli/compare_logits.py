"""`neo-jax compare-logits`: a checkpoint's float32 logits against a golden .npz file.

The golden file's layout: neo_jax/convert/compare.py.
"""

from __future__ import annotations

import argparse
import os

from neo_jax.config import ATTENTION_IMPLS
from neo_jax.convert import compare_logits, load_checkpoint, read_golden


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--checkpoint",
    required=True,
    metavar="DIR",
    help="HF NEO directory (config.json + safetensors) or neo-jax parameter "
    "directory (config.json + params/); loaded in float32",
  )
  parser.add_argument(
    "--golden",
    required=True,
    metavar="FILE.npz",
    help="golden file with input_ids [L], pixel_values [N_patches, 768], "
    "grid_hw [n_images, 2] and logits [L, V] from the PyTorch model",
  )
  parser.add_argument(
    "--atol",
    type=float,
    default=1e-4,
    help="largest allowed absolute logit difference (default: %(default)g); "
    "exit status 0 within it, 1 above it",
  )
  parser.add_argument(
    "--attention-impl",
    default="xla",
    choices=ATTENTION_IMPLS,
    metavar="NAME",
    help=f"attention implementation to check, one of "
    f"{', '.join(ATTENTION_IMPLS)} (default: %(default)s)",
  )


def run(args: argparse.Namespace) -> int:
  golden = read_golden(args.golden)
  params, config = load_checkpoint(
    args.checkpoint, dtype="float32", param_dtype="float32", attention_impl=args.attention_impl
  )
  result = compare_logits(params, config, golden)
  ok = result["max_abs_diff"] <= args.atol
  print(
    f"{os.path.basename(args.golden)}: max |logit diff| = {result['max_abs_diff']:.3e} "
    f"(atol {args.atol:g}, worst position {result['worst_position']}), "
    f"mean KL(golden || ours) = {result['mean_kl']:.3e}, argmax agreement "
    f"{result['argmax_agreement']:.1%} over {result['positions']} positions: "
    f"{'OK' if ok else 'FAIL'}"
  )
  return 0 if ok else 1
