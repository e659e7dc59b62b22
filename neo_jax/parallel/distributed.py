"""Process-group initialisation: the seam for multi-host runs.

`initialize()` is called once per process before any JAX computation. A single process needs
nothing; with a coordinator address (or `NEO_JAX_COORDINATOR` etc. in the environment) it calls
`jax.distributed.initialize`. Cluster auto-detection (TPU pods, SLURM) extends this function.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

_initialized = False


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Joins the process group when several processes are configured; idempotent.

  Arguments default to the environment variables NEO_JAX_COORDINATOR, NEO_JAX_NUM_PROCESSES
  and NEO_JAX_PROCESS_ID. Without a coordinator and with one process, this is a no-op.
  """
  global _initialized
  if _initialized:
    return
  env = os.environ
  coordinator_address = coordinator_address or env.get("NEO_JAX_COORDINATOR")
  if num_processes is None and env.get("NEO_JAX_NUM_PROCESSES"):
    num_processes = int(env["NEO_JAX_NUM_PROCESSES"])
  if process_id is None and env.get("NEO_JAX_PROCESS_ID"):
    process_id = int(env["NEO_JAX_PROCESS_ID"])
  if coordinator_address is None and (num_processes or 1) == 1:
    _initialized = True
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  _initialized = True


def is_primary() -> bool:
  """True on the process that writes logs and metadata (process 0)."""
  return jax.process_index() == 0
