"""`neo-jax train --config configs/X.py [--config.FIELD=VALUE ...]`: one training stage.

The run directory (`config.workdir`) receives checkpoints, metrics.jsonl and TensorBoard
events. Running the same command again resumes from its newest checkpoint. SIGTERM or
Ctrl-C saves a checkpoint after the current step and exits (status 143 / 130).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import jax
from absl import logging as absl_logging

from neo_jax import run_dir, stage
from neo_jax.parallel import distributed, make_mesh
from neo_jax.parallel.distributed import parse_device_ids
from neo_jax.trainer import config as config_lib

ACCEPTS_CONFIG_OVERRIDES = True

EPILOG = """\
Overrides: any field of the config, with the type of its default, e.g.
  --config.total_steps=500 --config.optimizer.lr=3e-4 --config.mesh.tensor=2
  --config.data.sources='("easy_vqa/vqa", "jsonl:/data/x.jsonl")' --config.workdir=runs/a
A config file may take an argument: --config configs/X.py:ARG.
Fields and their defaults: configs/common.py (or --print-config).
Running the same command again resumes from the newest readable checkpoint in
config.workdir (a damaged newer step is reported and moved to WORKDIR/damaged_checkpoints/);
SIGTERM or Ctrl-C saves a checkpoint after the current step and exits (status 143 / 130).
Exit status: 0 finished; 2 a bad flag, config value or file (one line says which); 1 the run
failed (non-finite values under nan_policy=stop, or more than max_skipped_share of the updates
skipped under nan_policy=skip); 143 / 130 stopped by a signal. --debug: tracebacks."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = EPILOG
  parser.add_argument(
    "--config",
    required=True,
    metavar="FILE[:ARG]",
    help="an ml_collections config file defining get_config()",
  )
  parser.add_argument(
    "--print-config",
    action="store_true",
    help="print the resolved config (after overrides) and exit",
  )
  parser.add_argument(
    "--log-level",
    default="INFO",
    choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    help="verbosity of the neo_jax loggers (default INFO)",
  )
  group = parser.add_argument_group(
    "multi-process runs",
    "Flags win over NEO_JAX_COORDINATOR / NEO_JAX_NUM_PROCESSES / NEO_JAX_PROCESS_ID / "
    "NEO_JAX_LOCAL_DEVICE_IDS, which win over SLURM (srun) and Cloud TPU VM detection; "
    "without any, one process (docs/multihost.md).",
  )
  group.add_argument(
    "--coordinator", metavar="HOST[:PORT]", help="address of process 0's coordination service"
  )
  group.add_argument(
    "--num-processes",
    type=int,
    metavar="N",
    help="processes in the run (1: single process, no cluster detection)",
  )
  group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
  group.add_argument(
    "--local-device-ids",
    type=_device_ids,
    metavar="IDS",
    help="accelerators this process drives, e.g. 0 (one process per GPU) or 0,1,2,3",
  )


def _device_ids(text: str) -> tuple[int, ...]:
  try:
    return parse_device_ids(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def setup_logging(level: str, name: str = "neo_jax") -> None:
  """Timestamped lines on stderr; the `name` loggers at `level`, everything else warnings."""
  logging.basicConfig(
    level=logging.WARNING,
    format="%(asctime)s %(levelname)s %(message)s",
    datefmt="%H:%M:%S",
    stream=sys.stderr,
  )
  logging.getLogger(name).setLevel(level)
  absl_logging.set_verbosity(absl_logging.WARNING)


def _log_topology(config) -> None:
  """Logs, on process 0, the processes and devices and how the configured mesh lies over them
  (which axes cross hosts), before the first compilation; a bad mesh is left to the trainer."""
  if not distributed.is_primary():
    return
  try:
    mesh = make_mesh(
      config.mesh.data,
      config.mesh.fsdp,
      config.mesh.tensor,
      devices=jax.devices()[: config.mesh.num_devices or None],
    )
  except ValueError:
    mesh = None
  logging.getLogger("neo_jax.train").info("topology: %s", distributed.describe_topology(mesh))


def run(args: argparse.Namespace) -> int:
  config = config_lib.load_config(args.config, getattr(args, "config_overrides", []))
  if args.print_config:
    print(config_lib.to_json(config), end="")
    return 0
  setup_logging(args.log_level)
  # before anything touches a device: joining a process group must come first
  distributed.initialize(
    getattr(args, "coordinator", None),
    getattr(args, "num_processes", None),
    getattr(args, "process_id", None),
    getattr(args, "local_device_ids", None),
  )
  _log_topology(config)
  result = stage.train(config)  # NonFiniteError / SkippedUpdatesError: one line, status 1
  where = run_dir.path(result.workdir)
  if result.status == "interrupted":
    print(
      f"neo-jax train: stopped by {result.signal} at step {result.step}; checkpoint saved "
      f"in {where}; run the same command to resume",
      file=sys.stderr,
    )
    return 128 + int(getattr(signal, result.signal))
  print(
    f"neo-jax train: finished {config.name} at step {result.step}; run directory {where}",
    file=sys.stderr,
  )
  return 0
