"""`neo-jax train --config configs/X.py [--config.FIELD=VALUE ...]`: one training stage.

The run directory (`config.workdir`) receives checkpoints, metrics.jsonl and TensorBoard
events. Running the same command again resumes from its newest checkpoint. SIGTERM or
Ctrl-C saves a checkpoint after the current step and exits (status 143 / 130).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

ACCEPTS_CONFIG_OVERRIDES = True

EPILOG = """\
Overrides: any field of the config, with the type of its default, e.g.
  --config.total_steps=500 --config.optimizer.lr=3e-4 --config.mesh.tensor=2
  --config.data.sources='("easy_vqa/vqa", "jsonl:/data/x.jsonl")' --config.workdir=runs/a
A config file may take an argument: --config configs/X.py:ARG.
Fields and their defaults: configs/common.py (or --print-config).
Running the same command again resumes from the newest checkpoint in config.workdir;
SIGTERM or Ctrl-C saves a checkpoint after the current step and exits (status 143 / 130)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = EPILOG
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="an ml_collections config file defining get_config()")
  parser.add_argument("--print-config", action="store_true",
                      help="print the resolved config (after overrides) and exit")
  parser.add_argument("--log-level", default="INFO",
                      choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                      help="verbosity of the neo_jax loggers (default INFO)")


def _setup_logging(level: str) -> None:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stderr)
  logging.getLogger("neo_jax").setLevel(level)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:  # pragma: no cover
    pass


def run(args: argparse.Namespace) -> int:
  from neo_jax.train import config_lib
  config = config_lib.load_config(args.config, getattr(args, "config_overrides", []))
  if args.print_config:
    print(config_lib.to_json(config), end="")
    return 0
  _setup_logging(args.log_level)
  from neo_jax.train.trainer import NonFiniteError, Trainer
  try:
    result = Trainer(config).run()
  except NonFiniteError as e:
    print(f"neo-jax train: error: {e}", file=sys.stderr)
    return 1
  where = os.path.abspath(result.workdir)
  if result.status == "interrupted":
    print(f"neo-jax train: stopped by {result.signal} at step {result.step}; checkpoint saved "
          f"in {where}; run the same command to resume", file=sys.stderr)
    return 128 + int(getattr(signal, result.signal))
  print(f"neo-jax train: finished {config.name} at step {result.step}; run directory {where}",
        file=sys.stderr)
  return 0
