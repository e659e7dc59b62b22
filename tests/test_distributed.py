"""Process-group detection: flags > NEO_JAX_* variables > SLURM / Cloud TPU VM > one process.

`detect` reads only the mapping it is given, so every cluster is simulated by its variables;
the group itself is started for real in tests/test_multihost.py.
"""

from __future__ import annotations

import pytest

from neo_jax.errors import UserError
from neo_jax.parallel import distributed
from neo_jax.parallel.distributed import (
  DEFAULT_PORT,
  detect,
  parse_device_ids,
  parse_hostlist,
  parse_tasks_per_node,
)

NO_TPU = {"tpu_vm": lambda env: False}
# what srun exports to task 5 of `srun --nodes=2 --ntasks-per-node=4` in job 4242
SLURM_PER_GPU = {
  "SLURM_JOB_ID": "4242",
  "SLURM_PROCID": "5",
  "SLURM_LOCALID": "1",
  "SLURM_STEP_NUM_TASKS": "8",
  "SLURM_NTASKS": "8",
  "SLURM_STEP_NODELIST": "gpu-[007-008]",
  "SLURM_JOB_NODELIST": "gpu-[003,007-008]",
  "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
  "CUDA_VISIBLE_DEVICES": "0,1,2,3",
}


@pytest.mark.parametrize(
  "text, hosts",
  [
    ("node1", ["node1"]),
    ("a,b", ["a", "b"]),
    ("node[001-003,007]", ["node001", "node002", "node003", "node007"]),
    ("gpu-a[8-10],login", ["gpu-a8", "gpu-a9", "gpu-a10", "login"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x[09-11]-ib", ["x09-ib", "x10-ib", "x11-ib"]),
  ],
)
def test_hostlists_expand_in_order(text, hosts):
  assert parse_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", "a[1-2", "a]1", "a[2-1]", "a[x]", "a[[1]]", "a,,b"])
def test_malformed_hostlists_are_rejected(text):
  with pytest.raises(ValueError):
    parse_hostlist(text)


def test_tasks_per_node_and_device_ids():
  assert parse_tasks_per_node("4(x2),3") == [4, 4, 3]
  assert parse_tasks_per_node("1") == [1]
  assert parse_device_ids("0, 2,3") == (0, 2, 3)
  for bad in ("", "a", "-1"):
    with pytest.raises(ValueError):
      parse_device_ids(bad)
  with pytest.raises(ValueError):
    parse_tasks_per_node("4(2)")


def test_nothing_set_is_one_process():
  group = detect(env={}, **NO_TPU)
  assert not group.multi_process and group.source == "single"
  assert distributed.ProcessGroup().describe() == "single process"


def test_flags_win_over_variables_and_a_bare_host_gets_the_port():
  env = {
    "NEO_JAX_COORDINATOR": "10.0.0.9:1234",
    "NEO_JAX_NUM_PROCESSES": "4",
    "NEO_JAX_PROCESS_ID": "3",
    "NEO_JAX_LOCAL_DEVICE_IDS": "0,1",
  }
  group = detect("head", None, 2, env=env, **NO_TPU)
  assert group.source == "explicit"
  assert group.coordinator_address == f"head:{DEFAULT_PORT}"
  assert (group.num_processes, group.process_id, group.local_device_ids) == (4, 2, (0, 1))
  origins = dict(group.origins)
  assert origins["coordinator_address"] == "--coordinator"
  assert origins["num_processes"] == "NEO_JAX_NUM_PROCESSES"
  assert origins["process_id"] == "--process-id"
  text = group.describe()
  assert text.startswith("explicit: ") and "process_id=2 (--process-id)" in text
  # variables alone; the port variable applies to a host without one
  group = detect(
    env={**env, "NEO_JAX_COORDINATOR": "head", "NEO_JAX_COORDINATOR_PORT": "9"}, **NO_TPU
  )
  assert (group.coordinator_address, group.process_id) == ("head:9", 3)


@pytest.mark.parametrize(
  "kwargs, env, message",
  [
    ({"coordinator_address": "h:1", "num_processes": 2}, {}, "missing --process-id"),
    ({"num_processes": 2, "process_id": 0}, {}, "missing --coordinator"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "not in [0, 2)"),
    ({}, {"NEO_JAX_NUM_PROCESSES": "two"}, "not an integer"),
  ],
)
def test_incomplete_or_inconsistent_groups_are_user_errors(kwargs, env, message):
  with pytest.raises(
    UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
  ):
    detect(**kwargs, env=env, **NO_TPU)


def test_one_process_turns_cluster_detection_off():
  group = detect(num_processes=1, env=SLURM_PER_GPU, tpu_vm=lambda env: True)
  assert not group.multi_process and "--num-processes=1" in group.describe()


def test_slurm_one_process_per_gpu():
  group = detect(env=SLURM_PER_GPU, **NO_TPU)
  assert group.source == "slurm"
  # the step's first node (not the job's), a per-job port
  assert group.coordinator_address == f"gpu-007:{DEFAULT_PORT + 4242 % 1000}"
  assert (group.num_processes, group.process_id) == (8, 5)
  assert group.local_device_ids == (1,)  # SLURM_LOCALID: each task keeps one GPU
  # flags still win, e.g. a fixed port
  group = detect(coordinator_address="gpu-007:7777", env=SLURM_PER_GPU, **NO_TPU)
  assert group.coordinator_address == "gpu-007:7777" and group.process_id == 5


def test_slurm_one_process_per_node_drives_all_its_gpus():
  env = {
    **SLURM_PER_GPU,
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
  }
  group = detect(env=env, **NO_TPU)
  assert (group.num_processes, group.process_id) == (2, 1)
  assert group.local_device_ids is None
  # already bound to one GPU by SLURM (--gpus-per-task=1): nothing to choose
  env = {**SLURM_PER_GPU, "CUDA_VISIBLE_DEVICES": "2"}
  assert detect(env=env, **NO_TPU).local_device_ids is None


def test_slurm_batch_script_without_srun_is_one_process():
  env = {
    "SLURM_JOB_ID": "7",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "16",
    "SLURM_JOB_NODELIST": "n[1-2]",
  }
  group = detect(env=env, **NO_TPU)
  assert not group.multi_process and "srun" in group.note


def test_tpu_vm_leaves_the_group_to_jax():
  hosts = {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"}
  assert distributed.on_tpu_vm(hosts)
  group = detect(env=hosts)
  assert group.source == "tpu" and group.coordinator_address is None
  assert group.num_processes is None and group.process_id is None
  assert detect(env={"TPU_WORKER_HOSTNAMES": "localhost"}).note == "a single-worker TPU VM"
  # full explicit settings on a TPU VM are used as they are
  group = detect("10.0.0.2:8476", 4, 1, env=hosts)
  assert group.source == "explicit" and group.process_id == 1


def test_initialize_keeps_one_process_without_starting_jax_distributed(monkeypatch):
  started = []
  monkeypatch.setattr(distributed, "_group", None)
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: started.append(kw))
  for var in (
    "NEO_JAX_COORDINATOR",
    "NEO_JAX_NUM_PROCESSES",
    "NEO_JAX_PROCESS_ID",
    "SLURM_JOB_ID",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
  ):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, "on_tpu_vm", lambda env: False)
  group = distributed.initialize(num_processes=1)
  assert not group.multi_process and started == []
  assert distributed.initialize("h:1", 2, 0) is group  # idempotent: the first group stays


def test_initialize_passes_a_resolved_group_and_stops_jax_redetecting(monkeypatch):
  started = []
  monkeypatch.setattr(distributed, "_group", None)
  monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: started.append(kw))
  monkeypatch.setattr(distributed, "on_tpu_vm", lambda env: False)
  for key, value in SLURM_PER_GPU.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("NEO_JAX_INIT_TIMEOUT", "42")
  group = distributed.initialize()
  assert group.source == "slurm"
  assert started == [
    {
      "coordinator_address": "gpu-007:8718",
      "num_processes": 8,
      "process_id": 5,
      "local_device_ids": [1],
      "cluster_detection_method": "deactivate",
      "initialization_timeout": 42,
    }
  ]


def test_topology_describes_the_mesh_over_processes():
  from neo_jax.parallel import make_mesh

  mesh = make_mesh(2, 2, 2)
  info = distributed.topology(mesh)
  assert info["process_count"] == 1 and info["global_devices"] == 8
  assert info["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert info["processes_per_axis"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert (
    "1 process(es), this is 0; 8 local / 8 global cpu devices"
    in distributed.describe_topology(mesh)
  )
