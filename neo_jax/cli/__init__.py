"""`neo-jax <command>`: one entry point, one module per command in this package.

`entry` (the console script) first restarts the process once with glibc's huge-page tunable
(neo_jax/cli/allocator.py); `main` is the command line itself, callable in-process.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. COMMANDS names
them, and `main` imports only the one that runs (the one deferred import of the package: it
keeps `neo-jax --help` instant). A module that sets `ACCEPTS_CONFIG_OVERRIDES = True` receives
the `--config.a.b=value` flags argparse does not know in `args.config_overrides`
(ml_collections-style overrides).

Errors follow neo_jax/errors.py: a user's mistake is one line and exit status 2, a run that
fails on its own terms one line and 1, and `--debug` (before or after the command) or
NEO_JAX_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from neo_jax.cli import allocator
from neo_jax.errors import (
  DEBUG_ENV,
  EXIT_RUN_FAILED,
  EXIT_USER_ERROR,
  RunError,
  UserError,
  debug_enabled,
  one_line,
)

# command -> (module, one-line help)
COMMANDS = {
  "demo": (
    "neo_jax.cli.demo",
    "the main job: train the tiny NEO on easy-vqa (pretrain -> SFT -> ACPO) on CPU",
  ),
  "train": ("neo_jax.cli.train", "train a NEO model from an ml_collections config"),
  "compare-preference": ("neo_jax.cli.compare_preference", "DPO vs ACPO from one SFT run"),
  "convert": ("neo_jax.cli.convert", "convert checkpoints: hf-to-jax | jax-to-hf | qwen3-to-neo"),
  "compare-logits": (
    "neo_jax.cli.compare_logits",
    "check a checkpoint's logits against a golden .npz file",
  ),
  "generate": ("neo_jax.cli.generate", "answer a prompt about images with a checkpoint"),
  "eval": ("neo_jax.cli.eval", "evaluate a checkpoint on VQA or POPE files"),
  "data": ("neo_jax.cli.data", "build and inspect data sets (TFDS builders, embedded data)"),
}

# what a user's input raises (ValueError covers json.JSONDecodeError and UnicodeDecodeError)
_USER_ERRORS = (
  UserError,
  ValueError,
  FileNotFoundError,
  NotADirectoryError,
  IsADirectoryError,
  PermissionError,
)
DEBUG_FLAG = "--debug"
_DEBUG_HELP = f"show the traceback of an error instead of one line (also: {DEBUG_ENV}=1)"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="neo-jax",
    description="NEO native vision-language models and ACPO preference training in JAX.",
    epilog="Run `neo-jax COMMAND --help` for a command's flags. Errors are one line on "
    "stderr: exit status 2 for a bad flag, config value or file, 1 for a run that "
    "failed (non-finite values, too many skipped updates), 130 / 143 when stopped by "
    "Ctrl-C / SIGTERM.",
  )
  parser.add_argument(DEBUG_FLAG, action="store_true", help=_DEBUG_HELP)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (_, help_text) in COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # --debug anywhere (before the command, after it, after a subcommand such as convert's)
  debug = DEBUG_FLAG in argv or debug_enabled()
  argv = [a for a in argv if a != DEBUG_FLAG]
  if not argv or argv[0] not in COMMANDS:
    parser = _parser()
    if not argv:
      parser.print_help()
      return 0
    parser.parse_args(argv)  # prints help or "invalid choice" and exits
    return EXIT_USER_ERROR
  name, rest = argv[0], argv[1:]
  module_name, help_text = COMMANDS[name]
  module = importlib.import_module(module_name)
  parser = argparse.ArgumentParser(prog=f"neo-jax {name}", description=help_text)
  module.add_arguments(parser)
  parser.add_argument(DEBUG_FLAG, action="store_true", help=_DEBUG_HELP)  # listed in --help
  if getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False):  # --config.a.b=value flags
    args, args.config_overrides = parser.parse_known_args(rest)
  else:
    args = parser.parse_args(rest)
  try:
    return int(module.run(args) or 0)
  except _USER_ERRORS as e:
    return _report(name, e, EXIT_USER_ERROR, debug)
  except RunError as e:
    return _report(name, e, EXIT_RUN_FAILED, debug)
  except KeyboardInterrupt:
    print(f"neo-jax {name}: interrupted", file=sys.stderr)
    return 130


def entry() -> None:
  """The `neo-jax` console script and `python -m neo_jax.cli`: the process first restarts
  itself with host memory on huge pages (neo_jax.cli.allocator), then runs `main`."""
  allocator.reexec_with_hugepages()
  sys.exit(main())


def _report(command: str, error: BaseException, status: int, debug: bool) -> int:
  """One line on stderr and the exit status; with --debug, the traceback instead."""
  if debug:
    raise error
  print(f"neo-jax {command}: error: {one_line(error)}", file=sys.stderr)
  return status
