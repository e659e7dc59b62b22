"""`neo-jax generate`: answer one prompt about zero or more images with a checkpoint.

The prompt is built as NEO's evaluation builds it (neo1_0 template): one image becomes
"<image>\\n" + text, several become "Image-1: <image>\\nImage-2: <image>\\n..." + text, and an
RGBA image with transparency is composited onto white. Images are resized within the
checkpoint's own min/max pixels (its config.json) unless --min-pixels / --max-pixels say
otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from neo_jax.config import DTYPES
from neo_jax.data.image import ImageError
from neo_jax.data.inputs import prepare_generation_inputs
from neo_jax.errors import UserError
from neo_jax.inference.generation import decode_text, generate
from neo_jax.inference.loading import load_for_inference
from neo_jax.inference.sampling import GREEDY, Sampling


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("decoding (default: greedy, as NEO's evaluation)")
  g.add_argument(
    "--greedy",
    action="store_true",
    help="pick the most likely token at every step (the default; conflicts with "
    "--temperature, --top-k and --top-p)",
  )
  g.add_argument(
    "--temperature",
    type=float,
    default=None,
    help="sample with this temperature (> 0); 0 means greedy",
  )
  g.add_argument(
    "--top-k",
    type=int,
    default=None,
    help="sample only among the K most likely tokens (needs --temperature)",
  )
  g.add_argument(
    "--top-p",
    type=float,
    default=None,
    help="sample only from the smallest set of most likely tokens whose "
    "probability reaches P, in (0, 1] (needs --temperature)",
  )
  g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default: 0)")


def sampling_from_args(args: argparse.Namespace):
  sampled = args.temperature not in (None, 0.0)
  filters = args.top_k is not None or args.top_p is not None
  if args.greedy and (sampled or filters):
    raise UserError("--greedy conflicts with --temperature / --top-k / --top-p")
  if filters and not sampled:
    raise UserError("--top-k / --top-p need a sampling --temperature > 0")
  if not sampled:
    return GREEDY
  try:
    return Sampling(
      temperature=args.temperature,
      top_k=args.top_k or 0,
      top_p=1.0 if args.top_p is None else args.top_p,
    )
  except ValueError as e:
    raise UserError(f"sampling flags: {e}") from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--checkpoint",
    required=True,
    metavar="DIR",
    help="an HF NEO directory (config.json + safetensors; converted while "
    "loading) or a neo-jax parameter directory (config.json + params/)",
  )
  parser.add_argument(
    "--tokenizer",
    default=None,
    metavar="DIR",
    help="tokenizer directory (default: the checkpoint's tokenizer files, or "
    "the built-in Qwen3 + NEO tokenizer if it has none)",
  )
  parser.add_argument(
    "--dtype",
    choices=DTYPES,
    default="float32",
    help="compute dtype (default: %(default)s); parameters keep their stored dtype",
  )
  parser.add_argument(
    "--min-pixels",
    type=int,
    default=None,
    help="smallest resized image area (default: the checkpoint's vision_config.min_pixels)",
  )
  parser.add_argument(
    "--max-pixels",
    type=int,
    default=None,
    help="largest resized image area (default: the checkpoint's vision_config.max_pixels)",
  )


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.epilog = (
    "The prompt follows NEO's evaluation: one image -> '<image>\\n' + text; "
    "several -> 'Image-1: <image>\\nImage-2: <image>\\n...' + text; RGBA images "
    "with transparency are put on white."
  )
  add_model_arguments(parser)
  parser.add_argument(
    "--image",
    action="append",
    default=[],
    metavar="PATH",
    help="an image file; repeat for several images (none: a text-only chat)",
  )
  parser.add_argument("--prompt", required=True, help="the question or instruction")
  parser.add_argument(
    "--system", default="", help="system prompt (default: none, as NEO's evaluation)"
  )
  parser.add_argument(
    "--max-new-tokens",
    type=int,
    default=512,
    help="most tokens to generate (default: %(default)s); generation stops earlier at <|im_end|>",
  )
  add_sampling_arguments(parser)
  parser.add_argument(
    "--json",
    action="store_true",
    help='print {"text": ..., "token_ids": [...]}: the new tokens (the stop '
    "token included when reached) and their text without the stop token",
  )


def run(args: argparse.Namespace) -> int:
  if args.max_new_tokens < 1:
    raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  sampling = sampling_from_args(args)

  model = load_for_inference(args.checkpoint, dtype=args.dtype, tokenizer_dir=args.tokenizer)
  config = model.config
  try:
    prompt = prepare_generation_inputs(
      model.tokenizer,
      config,
      args.prompt,
      args.image,
      system=args.system,
      min_pixels=args.min_pixels,
      max_pixels=args.max_pixels,
    )
  except ImageError as e:
    raise UserError(f"--image: {e}") from None
  out = generate(
    model.params, config, [prompt], args.max_new_tokens, sampling, jax.random.key(args.seed)
  )
  ids = out.token_lists()[0]
  text = decode_text(model.tokenizer, ids, (config.eos_token_id,))
  if args.json:
    print(json.dumps({"text": text, "token_ids": ids}, ensure_ascii=False))
  else:
    print(text)
  sys.stdout.flush()
  return 0
