"""A checkpoint ready to answer prompts: parameters, config and the tokenizer that goes with it.

The checkpoint is any kind `neo_jax.convert.load_checkpoint` knows (an HF NEO directory is
converted while loading, a neo-jax parameter directory is restored). The tokenizer comes from
the checkpoint directory's own files (tokenizer.json); a directory without them falls back to
the project's built-in Qwen3 + NEO tokenizer, with a warning, since a fine-tuned model may have
used other ids.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from neo_jax.config import NeoConfig
from neo_jax.convert import load_checkpoint
from neo_jax.data.tokenizer import load_tokenizer
from neo_jax.errors import UserError


class InferenceModel(NamedTuple):
  params: Any
  config: NeoConfig
  tokenizer: Any  # neo_jax.data.tokenizer.NeoTokenizer
  tokenizer_dir: str


def _warn_stderr(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def load_tokenizer_for(
  checkpoint: str, tokenizer_dir: str | None = None, warn: Callable[[str], None] = _warn_stderr
) -> Any:
  """The tokenizer of `checkpoint` (or of `tokenizer_dir` when given), else the built-in one."""
  try:
    if tokenizer_dir is not None:
      return load_tokenizer(tokenizer_dir)
    if os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
      return load_tokenizer(checkpoint)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"tokenizer: {e}") from None
  warn(f"{checkpoint} has no tokenizer.json; using the built-in Qwen3 + NEO tokenizer")
  return load_tokenizer(None)


def check_tokenizer(tokenizer: Any, config: NeoConfig, where: str) -> None:
  """The special-token ids the model was built with must be the tokenizer's."""
  pairs = [
    ("<IMG_CONTEXT>", tokenizer.img_context_id, config.img_context_token_id),
    ("<img>", tokenizer.img_start_id, config.img_start_token_id),
    ("</img>", tokenizer.img_end_id, config.img_end_token_id),
  ]
  for name, tok_id, cfg_id in pairs:
    if tok_id != cfg_id:
      raise UserError(f"{where}: tokenizer maps {name} to {tok_id}, config.json to {cfg_id}")
  if tokenizer.vocab_size > config.vocab_size:
    raise UserError(
      f"{where}: tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}"
    )


def load_for_inference(
  checkpoint: str,
  *,
  dtype: str = "float32",
  tokenizer_dir: str | None = None,
  attention_impl: str = "auto",
  warn: Callable[[str], None] = _warn_stderr,
) -> InferenceModel:
  """Loads parameters (compute in `dtype`; stored dtypes kept) and the matching tokenizer."""
  checkpoint = os.fspath(checkpoint)
  params, config = load_checkpoint(
    checkpoint, dtype=dtype, attention_impl=attention_impl, remat_policy="none"
  )
  tokenizer = load_tokenizer_for(checkpoint, tokenizer_dir, warn)
  check_tokenizer(tokenizer, config, checkpoint)
  return InferenceModel(params, config, tokenizer, str(tokenizer.directory))
