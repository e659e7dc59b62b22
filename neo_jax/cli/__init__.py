"""`neo-jax <command>`: one entry point, one module per command in this package.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. COMMANDS names
them, and `main` imports only the one that runs (the one deferred import of the package: it
keeps `neo-jax --help` instant). A module that sets `ACCEPTS_CONFIG_OVERRIDES = True` receives
the `--config.a.b=value` flags argparse does not know in `args.config_overrides`
(ml_collections-style overrides).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from neo_jax.errors import UserError

# command -> (module, one-line help)
COMMANDS = {
    "demo": ("neo_jax.cli.demo",
             "the main job: train the tiny NEO on easy-vqa (pretrain -> SFT -> ACPO) on CPU"),
    "train": ("neo_jax.cli.train", "train a NEO model from an ml_collections config"),
    "compare-preference": ("neo_jax.cli.compare_preference", "DPO vs ACPO from one SFT run"),
    "convert": ("neo_jax.cli.convert",
                "convert checkpoints: hf-to-jax | jax-to-hf | qwen3-to-neo"),
    "compare-logits": ("neo_jax.cli.compare_logits",
                       "check a checkpoint's logits against a golden .npz file"),
    "generate": ("neo_jax.cli.generate", "answer a prompt about images with a checkpoint"),
    "eval": ("neo_jax.cli.eval", "evaluate a checkpoint on VQA or POPE files"),
    "data": ("neo_jax.cli.data", "build and inspect data sets (TFDS builders, embedded data)"),
}

_USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="neo-jax",
      description="NEO native vision-language models and ACPO preference training in JAX.",
      epilog="Run `neo-jax COMMAND --help` for a command's flags. Set NEO_JAX_DEBUG=1 to see "
             "full tracebacks.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (_, help_text) in COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in COMMANDS:
    parser = _parser()
    if not argv:
      parser.print_help()
      return 0
    parser.parse_args(argv)  # prints help or "invalid choice" and exits
    return 2
  name, rest = argv[0], argv[1:]
  module_name, help_text = COMMANDS[name]
  module = importlib.import_module(module_name)
  parser = argparse.ArgumentParser(prog=f"neo-jax {name}", description=help_text)
  module.add_arguments(parser)
  if getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False):  # --config.a.b=value flags
    args, args.config_overrides = parser.parse_known_args(rest)
  else:
    args = parser.parse_args(rest)
  try:
    return int(module.run(args) or 0)
  except _USER_ERRORS as e:
    if os.environ.get("NEO_JAX_DEBUG"):
      raise
    print(f"neo-jax {name}: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"neo-jax {name}: interrupted", file=sys.stderr)
    return 130

