"""`neo-jax convert hf-to-jax | jax-to-hf | qwen3-to-neo`.

Each tensor holding NaN or Inf is named in a warning line on stderr; it is converted as it
is (the conversion is exact either way).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from neo_jax.config import DTYPES
from neo_jax.convert import files, hf_checkpoint, jax_checkpoint
from neo_jax.convert.mapping import nonfinite_tensors
from neo_jax.convert.qwen3 import qwen3_to_neo
from neo_jax.data import tokenizer as tok_lib
from neo_jax.errors import UserError

KEEP = "keep"


def _dtype_flag(parser: argparse.ArgumentParser, what: str) -> None:
  parser.add_argument(
    "--dtype",
    choices=(KEEP,) + DTYPES,
    default=KEEP,
    help=f"dtype of the {what} (default: %(default)s = the dtype each "
    f"tensor is stored in, so a round trip is bit-identical)",
  )


def _common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="replace a checkpoint already in --out (default: refuse)",
  )
  parser.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="show a progress bar over tensors (default: only on a terminal)",
  )


def _shard_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--max-shard-size",
    default="5GB",
    metavar="SIZE",
    help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default: "
    "%(default)s); above it the weights are split into numbered shards "
    "with a model.safetensors.index.json",
  )


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.epilog = "Run `neo-jax convert DIRECTION --help` for the flags of a direction."
  sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")

  p = sub.add_parser(
    "hf-to-jax",
    help="HF NEO directory -> neo-jax parameter directory",
    description="Convert an HF NEO checkpoint (config.json + model.safetensors "
    "or sharded with model.safetensors.index.json) to a neo-jax "
    "parameter directory (config.json + params/ in orbax format). "
    "Tokenizer and generation files are copied along.",
  )
  p.add_argument("--src", required=True, metavar="HF_DIR", help="the HF NEO directory to read")
  p.add_argument("--out", required=True, metavar="DIR", help="the neo-jax directory to write")
  _dtype_flag(p, "stored parameters")
  _common_flags(p)

  p = sub.add_parser(
    "jax-to-hf",
    help="neo-jax parameter directory -> HF NEO directory",
    description="Convert a neo-jax parameter directory back to an HF NEO "
    "checkpoint with the exact key names of the PyTorch model. "
    "Tokenizer and generation files are copied along.",
  )
  p.add_argument("--src", required=True, metavar="DIR", help="the neo-jax directory to read")
  p.add_argument("--out", required=True, metavar="HF_DIR", help="the HF directory to write")
  _dtype_flag(p, "safetensors tensors")
  _shard_flag(p)
  _common_flags(p)

  p = sub.add_parser(
    "qwen3-to-neo",
    help="initialise NEO from a Qwen3 HF checkpoint",
    description="Build a NEO from a Qwen3 checkpoint (config.json + "
    "safetensors): Qwen3 layer i becomes NEO layer i + E, the E "
    "pre-Buffer layers and the vision convs are freshly "
    "initialised, q_proj_hw is derived from q_proj and k_proj_hw "
    "is zero, so on text the new model computes exactly Qwen3. "
    "The output carries NEO's tokenizer (Qwen3's plus "
    "<IMG_CONTEXT> and NEO's other added tokens) and the Qwen3 "
    "directory's generation_config.json.",
  )
  p.add_argument("--src", required=True, metavar="QWEN3_DIR", help="the Qwen3 directory to read")
  p.add_argument("--out", required=True, metavar="DIR", help="the NEO directory to write")
  p.add_argument(
    "--prebuffer-layers",
    type=int,
    required=True,
    metavar="E",
    help="number of new pre-Buffer layers placed before the Qwen3 layers (NEO-2B: 12, NEO-9B: 6)",
  )
  p.add_argument(
    "--format",
    choices=("jax", "hf"),
    default="jax",
    help="write a neo-jax parameter directory (jax) or an HF NEO directory (hf) "
    "(default: %(default)s)",
  )
  p.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the pre-Buffer and vision initialisation (default: %(default)s)",
  )
  p.add_argument(
    "--vision-hidden-size",
    type=int,
    default=1024,
    help="width C of the 16-px patch features (default: %(default)s)",
  )
  p.add_argument(
    "--rope-theta-vision",
    type=float,
    default=1000.0,
    help="theta of the vision 2-D rotary; NEO's training default (default: %(default)g)",
  )
  p.add_argument(
    "--rope-theta-hw",
    type=float,
    default=10000.0,
    help="theta of the H and W sub-head RoPE (default: %(default)g)",
  )
  _dtype_flag(p, "written parameters (keep = the dtype of Qwen3's embeddings)")
  _shard_flag(p)
  _common_flags(p)


def _dtype(args: argparse.Namespace):
  return None if args.dtype == KEEP else args.dtype


def _write(
  args: argparse.Namespace, params, config, fmt: str, shard_bytes, carry_from: str | None
) -> str:
  if fmt == "jax":
    return jax_checkpoint.save_params(
      args.out, params, config, tokenizer_dir=carry_from, overwrite=args.overwrite
    )
  out = os.path.abspath(args.out)
  hf_checkpoint.write_hf_neo(
    out,
    params,
    config,
    dtype=_dtype(args),
    max_shard_bytes=shard_bytes,
    carry_from=carry_from,
    overwrite=args.overwrite,
    progress=args.progress,
  )
  return out


def _neo_tokenizer_files(qwen3_dir: str) -> str:
  """A directory with NEO's tokenizer (Qwen3's plus NEO's added tokens at their ids) and the
  Qwen3 directory's generation files: what a NEO checkpoint made from Qwen3 carries.

  A Qwen3 tokenizer does not know `<IMG_CONTEXT>` and the other NEO tokens, so copying it
  would leave a checkpoint that cannot build its own image prompts.
  """
  staging = tempfile.mkdtemp(prefix="neo_jax_tokenizer_")
  tok_lib.load_tokenizer().save(staging)  # built once into the cache
  for name in files.carried_files(qwen3_dir):
    if name not in tok_lib.HF_TOKENIZER_FILES:
      shutil.copy2(os.path.join(qwen3_dir, name), os.path.join(staging, name))
  return staging


def warn_nonfinite(params, config) -> None:
  """A warning line on stderr for each tensor holding NaN or Inf (converted as it is)."""
  for line in nonfinite_tensors(params, config):
    print(f"warning: non-finite values in {line}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
  shard_bytes = files.parse_size(args.max_shard_size) if hasattr(args, "max_shard_size") else None
  if args.direction == "hf-to-jax":
    compute = {} if _dtype(args) is None else {"param_dtype": _dtype(args)}
    params, config = hf_checkpoint.read_hf_neo(args.src, progress=args.progress, **compute)
    warn_nonfinite(params, config)
    out = _write(args, params, config, "jax", shard_bytes, carry_from=args.src)
  elif args.direction == "jax-to-hf":
    params, config = jax_checkpoint.load_params(args.src)
    warn_nonfinite(params, config)
    out = _write(args, params, config, "hf", shard_bytes, carry_from=args.src)
  else:
    if args.prebuffer_layers < 0:
      raise UserError(f"--prebuffer-layers must be >= 0, got {args.prebuffer_layers}")
    params, config = qwen3_to_neo(
      args.src,
      args.prebuffer_layers,
      seed=args.seed,
      dtype=_dtype(args),
      progress=args.progress,
      vision_hidden_size=args.vision_hidden_size,
      rope_theta_vision=args.rope_theta_vision,
      rope_theta_hw=args.rope_theta_hw,
    )
    warn_nonfinite(params, config)
    carry = _neo_tokenizer_files(args.src)
    try:
      out = _write(args, params, config, args.format, shard_bytes, carry_from=carry)
    finally:
      shutil.rmtree(carry, ignore_errors=True)
  print(
    f"wrote {out}: {config.num_hidden_layers} layers ({config.num_prebuffer_layers} "
    f"pre-Buffer), hidden {config.hidden_size}, {_dtype(args) or config.param_dtype}, "
    f"{'tied' if config.tie_word_embeddings else 'untied'} head"
  )
  return 0
