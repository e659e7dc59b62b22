"""Process-group initialisation for multi-host runs, from flags, variables or the cluster.

`initialize()` runs once per process, before any JAX computation (the trainer and
`neo-jax train` call it). Each field of the group (coordinator address, process count,
process id, local device ids) is taken from the first of these that sets it:

  1. arguments: `neo-jax train --coordinator HOST:PORT --num-processes N --process-id I
     --local-device-ids 0,1`
  2. variables: NEO_JAX_COORDINATOR, NEO_JAX_NUM_PROCESSES, NEO_JAX_PROCESS_ID,
     NEO_JAX_LOCAL_DEVICE_IDS
  3. the cluster, detected from the environment:
       SLURM    inside an srun step (SLURM_JOB_ID, SLURM_PROCID, SLURM_STEP_NUM_TASKS or
                SLURM_NTASKS); coordinator = first host of SLURM_STEP_NODELIST (else
                SLURM_JOB_NODELIST), expanded here (no scontrol), port NEO_JAX_COORDINATOR_PORT
                or 8476 + SLURM_JOB_ID % 1000; with several tasks on a node, each process
                keeps the GPU of its SLURM_LOCALID
       TPU VM   a Cloud TPU VM (libtpu and /dev/accel* or /dev/vfio, or TPU_WORKER_HOSTNAMES):
                JAX reads the slice's workers from the TPU metadata
                (`jax.distributed.initialize()` without arguments)
  4. nothing: a single process; jax.distributed is not started.

A process count of 1 from any layer means a single process, so `--num-processes 1` turns
cluster detection off (e.g. to debug inside a SLURM allocation). Python run directly in an
sbatch script (not under srun) is one process: starting a group there would wait forever for
tasks that do not exist.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import math
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from neo_jax.errors import UserError

logger = logging.getLogger("neo_jax.parallel")

DEFAULT_PORT = 8476
ENV_COORDINATOR = "NEO_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "NEO_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "NEO_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "NEO_JAX_LOCAL_DEVICE_IDS"
ENV_PORT = "NEO_JAX_COORDINATOR_PORT"
ENV_INIT_TIMEOUT = "NEO_JAX_INIT_TIMEOUT"  # seconds to wait for every process (default 300)
# variables naming the accelerators a process may see; one entry means it was bound already
_VISIBLE_DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
_FIELDS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process sits, as resolved before `jax.distributed.initialize`.

  `source` is "single" (no group), "explicit" (arguments / NEO_JAX_* only), "slurm" or "tpu";
  `origins` names, per field, the flag or variable it came from (for the start-up log).
  Fields left None on a TPU VM are filled in by JAX from the TPU metadata.
  """

  source: str = "single"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  origins: tuple[tuple[str, str], ...] = ()
  note: str = ""  # why a cluster environment still runs one process, if it does

  @property
  def multi_process(self) -> bool:
    return self.source != "single"

  def describe(self) -> str:
    if not self.multi_process:
      return "single process" + (f" ({self.note})" if self.note else "")
    origins = dict(self.origins)
    parts = [
      f"{name}={getattr(self, name)} ({origins.get(name, 'JAX')})"
      for name in _FIELDS
      if getattr(self, name) is not None or self.source == "tpu"
    ]
    return f"{self.source}: " + ", ".join(parts)


# --- parsing SLURM's compact lists ------------------------------------------------------------


def _split_top(text: str) -> list[str]:
  """Splits at commas outside brackets ("a[1,2],b" -> ["a[1,2]", "b"])."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch == "[":
      depth += 1
      if depth > 1:
        raise ValueError(f"hostlist {text!r}: nested brackets")
    elif ch == "]":
      depth -= 1
      if depth < 0:
        raise ValueError(f"hostlist {text!r}: unbalanced ']'")
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"hostlist {text!r}: unbalanced '['")
  parts.append(text[start:])
  return parts


def _expand_range(body: str, whole: str) -> list[str]:
  """ "001-003,7" -> ["001", "002", "003", "7"]; a range keeps the width of its start."""
  out = []
  for item in body.split(","):
    lo, sep, hi = item.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
      raise ValueError(f"hostlist {whole!r}: bad range {item!r}")
    if not sep:
      out.append(lo)
      continue
    if int(hi) < int(lo):
      raise ValueError(f"hostlist {whole!r}: range {item!r} runs backwards")
    out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
  return out


def parse_hostlist(text: str) -> list[str]:
  """Expands a SLURM hostlist, in order: "node[001-003,007],gpu-a[1-2]" -> node001, node002,
  node003, node007, gpu-a1, gpu-a2. Several bracket groups in one name multiply
  ("r[1-2]n[1-2]" -> r1n1, r1n2, r2n1, r2n2), as in SLURM."""
  text = text.strip()
  if not text:
    raise ValueError("hostlist is empty")
  hosts = []
  for part in _split_top(text):
    if not part:
      raise ValueError(f"hostlist {text!r}: empty name")
    names = [""]
    for m in re.finditer(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
      literal, body = m.group(1), m.group(2)
      choices = [""] if body is None else _expand_range(body, text)
      names = [n + literal + c for n in names for c in choices]
    hosts.extend(names)
  return hosts


def parse_tasks_per_node(text: str) -> list[int]:
  """SLURM_STEP_TASKS_PER_NODE: "4(x2),3" -> [4, 4, 3]."""
  counts = []
  for item in text.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
    if not m:
      raise ValueError(f"tasks per node {text!r}: bad item {item!r}")
    counts.extend([int(m.group(1))] * int(m.group(2) or 1))
  return counts


def parse_device_ids(text: str) -> tuple[int, ...]:
  """ "0,1,3" -> (0, 1, 3)."""
  try:
    ids = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise ValueError(f"device ids {text!r}: expected integers separated by commas") from None
  if not ids or any(i < 0 for i in ids):
    raise ValueError(f"device ids {text!r}: expected non-negative integers")
  return ids


# --- detection --------------------------------------------------------------------------------


def _int(value: str, name: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{name}={value!r} is not an integer") from None


def _with_port(address: str, env: Mapping[str, str], default: int = DEFAULT_PORT) -> str:
  """HOST -> HOST:PORT (NEO_JAX_COORDINATOR_PORT or the default); HOST:PORT unchanged."""
  if re.search(r":\d+$", address):
    return address
  return f"{address}:{_int(env[ENV_PORT], ENV_PORT) if env.get(ENV_PORT) else default}"


def _slurm(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str], str]:
  """(fields, origins, note) from SLURM variables; empty fields outside an srun step."""
  if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
    return {}, {}, ""
  tasks_var = next(
    (v for v in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") if env.get(v)), None
  )
  in_step = "SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_NODELIST" in env
  if tasks_var is None or not in_step:
    return {}, {}, "a SLURM job but not an srun step: launch with srun for several processes"
  count = _int(env[tasks_var], tasks_var)
  if count <= 1:
    return {}, {}, f"SLURM step with {tasks_var}={count}"
  nodes_var = next(
    (v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)), None
  )
  if nodes_var is None:
    raise UserError(
      "SLURM: no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST to find the "
      "coordinator; set NEO_JAX_COORDINATOR"
    )
  try:
    hosts = parse_hostlist(env[nodes_var])
  except ValueError as e:
    raise UserError(f"SLURM: {nodes_var}: {e}") from None
  port = DEFAULT_PORT + _int(env["SLURM_JOB_ID"].split("_")[0], "SLURM_JOB_ID") % 1000
  fields: dict[str, Any] = {
    "coordinator_address": _with_port(hosts[0], env, port),
    "num_processes": count,
    "process_id": _int(env["SLURM_PROCID"], "SLURM_PROCID"),
  }
  origins = {
    "coordinator_address": f"first host of {nodes_var}",
    "num_processes": tasks_var,
    "process_id": "SLURM_PROCID",
  }
  per_node_var = next(
    (v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if env.get(v)), None
  )
  try:
    several = (
      max(parse_tasks_per_node(env[per_node_var])) > 1 if per_node_var else count > len(hosts)
    )
  except ValueError as e:
    raise UserError(f"SLURM: {per_node_var}: {e}") from None
  bound = [v for v in _VISIBLE_DEVICE_VARS if env.get(v) and len(env[v].split(",")) == 1]
  if several and not bound and "SLURM_LOCALID" in env:
    # one process per device: SLURM did not restrict the visible devices, so pick ours
    fields["local_device_ids"] = (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)
    origins["local_device_ids"] = "SLURM_LOCALID (several tasks per node)"
  return fields, origins, ""


def _tpu_hosts(env: Mapping[str, str]) -> list[str] | None:
  value = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  return [h for h in value.split(",") if h.strip()] if value else None


def on_tpu_vm(env: Mapping[str, str]) -> bool:
  """A Cloud TPU VM: TPU worker variables, or libtpu installed next to TPU device files."""
  if _tpu_hosts(env) is not None:
    return True
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def detect(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
  *,
  env: Mapping[str, str] | None = None,
  tpu_vm: Callable[[Mapping[str, str]], bool] | None = None,
) -> ProcessGroup:
  """The process group this process belongs to (see the module docstring for the order).

  Reads only `env` (default os.environ) and, for TPU VMs, `tpu_vm(env)` (default
  `on_tpu_vm`); starts nothing, so it is safe to call anywhere.
  """
  env = os.environ if env is None else env
  tpu_vm = on_tpu_vm if tpu_vm is None else tpu_vm
  fields: dict[str, Any] = {}
  origins: dict[str, str] = {}

  def offer(name: str, value: Any, origin: str) -> None:
    if value is not None and name not in fields:
      fields[name], origins[name] = value, origin

  offer("coordinator_address", coordinator_address, "--coordinator")
  offer("num_processes", num_processes, "--num-processes")
  offer("process_id", process_id, "--process-id")
  offer(
    "local_device_ids",
    tuple(local_device_ids) if local_device_ids is not None else None,
    "--local-device-ids",
  )
  if env.get(ENV_COORDINATOR):
    offer("coordinator_address", env[ENV_COORDINATOR], ENV_COORDINATOR)
  if env.get(ENV_NUM_PROCESSES):
    offer("num_processes", _int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  if env.get(ENV_PROCESS_ID):
    offer("process_id", _int(env[ENV_PROCESS_ID], ENV_PROCESS_ID), ENV_PROCESS_ID)
  if env.get(ENV_LOCAL_DEVICE_IDS):
    try:
      ids = parse_device_ids(env[ENV_LOCAL_DEVICE_IDS])
    except ValueError as e:
      raise UserError(f"{ENV_LOCAL_DEVICE_IDS}: {e}") from None
    offer("local_device_ids", ids, ENV_LOCAL_DEVICE_IDS)

  if fields.get("num_processes") == 1:
    return ProcessGroup(note=f"{origins['num_processes']}=1")
  source, note = "explicit", ""
  slurm_fields, slurm_origins, note = _slurm(env)
  if slurm_fields:
    source = "slurm"
    for name, value in slurm_fields.items():
      offer(name, value, slurm_origins[name])
  elif tpu_vm(env) and not {"coordinator_address", "num_processes"} <= fields.keys():
    hosts = _tpu_hosts(env)
    if hosts is not None and len(hosts) == 1 and "num_processes" not in fields:
      return ProcessGroup(note="a single-worker TPU VM")
    return ProcessGroup(
      source="tpu", origins=tuple(origins.items()), **{k: v for k, v in fields.items()}
    )
  if not fields or fields.keys() == {"local_device_ids"}:
    return ProcessGroup(note=note)

  missing = [
    flag
    for name, flag in (
      ("coordinator_address", "--coordinator / " + ENV_COORDINATOR),
      ("num_processes", "--num-processes / " + ENV_NUM_PROCESSES),
      ("process_id", "--process-id / " + ENV_PROCESS_ID),
    )
    if name not in fields
  ]
  if missing:
    given = ", ".join(f"{origins[n]}" for n in _FIELDS if n in fields)
    raise UserError(
      f"a process group needs a coordinator, a process count and a process id: "
      f"{given} given, missing {'; '.join(missing)}"
    )
  count, index = fields["num_processes"], fields["process_id"]
  if count < 1 or not 0 <= index < count:
    raise UserError(
      f"process id {index} ({origins['process_id']}) is not in [0, {count}) "
      f"({origins['num_processes']})"
    )
  fields["coordinator_address"] = _with_port(fields["coordinator_address"], env)
  return ProcessGroup(source=source, origins=tuple(origins.items()), **fields)


# --- initialisation ---------------------------------------------------------------------------

_group: ProcessGroup | None = None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
) -> ProcessGroup:
  """Joins the process group `detect` finds (a no-op for one process); idempotent.

  Must run before the first JAX computation of the process. A group started by the caller
  (`jax.distributed.initialize` called directly) is kept as it is.
  """
  global _group
  if _group is not None:
    return _group
  if jax.distributed.is_initialized():
    _group = ProcessGroup(
      source="external",
      num_processes=jax.process_count(),
      process_id=jax.process_index(),
      note="jax.distributed.initialize was called by the program",
    )
    return _group
  group = detect(coordinator_address, num_processes, process_id, local_device_ids)
  if group.multi_process:
    timeout = os.environ.get(ENV_INIT_TIMEOUT)
    kwargs = {f: getattr(group, f) for f in _FIELDS if getattr(group, f) is not None}
    if kwargs.get("local_device_ids") is not None:
      kwargs["local_device_ids"] = list(kwargs["local_device_ids"])
    if group.source != "tpu":
      # everything is resolved: keep JAX's own cluster detection from replacing a field
      # (its SLURM support would restrict a one-process-per-node run to GPU SLURM_LOCALID)
      kwargs["cluster_detection_method"] = "deactivate"
    if timeout:
      kwargs["initialization_timeout"] = _int(timeout, ENV_INIT_TIMEOUT)
    logger.info("joining the process group: %s", group.describe())
    jax.distributed.initialize(**kwargs)
    # every process says where it landed: the first thing to compare when a run hangs
    local = jax.local_devices()
    logger.info(
      "process %d of %d joined: %d local %s device(s) %s, %d global",
      jax.process_index(),
      jax.process_count(),
      len(local),
      local[0].platform if local else "?",
      [d.id for d in local],
      jax.device_count(),
    )
  elif group.note:
    logger.info("single process: %s", group.note)
  _group = group
  return group


def process_group() -> ProcessGroup | None:
  """The group `initialize` joined (None before it ran)."""
  return _group


def is_primary() -> bool:
  """True on the process that writes logs and metadata (process 0)."""
  return jax.process_index() == 0


def preemption_service_active(counter: int = 0) -> bool:
  """True when JAX's preemption service can coordinate a stop: a process group with the
  service on, whose SIGTERM handler (installed by JAX in C) is not replaced by a Python one.
  `counter` is the caller's current sync-point counter (the probe reports it). Every process
  gets the same answer (the processes compare theirs), so all of them stop the same way."""
  if jax.process_count() <= 1:
    return False
  try:
    multihost_utils.reached_preemption_sync_point(counter)  # raises without the service
    usable = not callable(signal.getsignal(signal.SIGTERM))
  except RuntimeError:
    usable = False
  return bool(np.min(multihost_utils.process_allgather(np.int32(usable))))


def topology(mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Processes, devices and the mesh as seen by this process (after initialisation)."""
  local = jax.local_devices()
  info: dict[str, Any] = {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "local_devices": len(local),
    "global_devices": jax.device_count(),
    "platform": local[0].platform if local else jax.default_backend(),
    "device_kind": local[0].device_kind if local else "",
    "local_device_ids": [d.id for d in local],
  }
  if _group is not None:
    info["detected_by"] = _group.source
  if mesh is not None:
    info["mesh"] = dict(mesh.shape)
    # how many processes each mesh axis spans: >1 means its collectives cross hosts
    devices = np.asarray(mesh.devices)
    spans = {}
    for axis, name in enumerate(mesh.axis_names):
      rows = np.moveaxis(devices, axis, -1).reshape(-1, devices.shape[axis])
      spans[name] = max(len({d.process_index for d in row}) for row in rows)
    info["processes_per_axis"] = spans
  return info


def describe_topology(mesh: jax.sharding.Mesh | None = None) -> str:
  t = topology(mesh)
  text = (
    f"{t['process_count']} process(es), this is {t['process_index']}; "
    f"{t['local_devices']} local / {t['global_devices']} global {t['platform']} devices "
    f"({t['device_kind']})"
  )
  if "detected_by" in t:
    text += f"; group: {t['detected_by']}"
  if "mesh" in t:
    text += (
      f"; mesh {t['mesh']}, processes spanned per axis {t['processes_per_axis']}"
      f" ({math.prod(t['mesh'].values())} devices)"
    )
  return text
