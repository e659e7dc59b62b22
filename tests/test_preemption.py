"""Stopping a multi-process run: real processes, a real coordinator, the real `neo-jax train`.

Two processes (one CPU device each, fsdp over both) train the tiny `local` pretrain stage.
A run directory goes through several launches: SIGTERM to ONE process at a random step (JAX's
preemption service decides), then, resumed, SIGTERM to BOTH processes a second apart, then
resumed to the end; (slow) with JAX's preemption service off, SIGHUP to one process (a dropped
ssh session), then resumed to the end.

Every interrupted launch must end on both processes after the same step with exit status
128 + signal, leave exactly that step as the newest checkpoint, and the losses of all launches
together must equal those of one uninterrupted run, bit for bit.

The same file is the worker: `python tests/test_preemption.py WORKDIR PORT PID STEPS` runs one
process, each update slowed by a sleep (so that signals land mid-run; numerics unchanged).
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_multihost import _env, _free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "pretrain.py") + ":tiny,local"
STEPS = 40
STEP_SLEEP_S = 0.1
OVERRIDES = (
  "--config.mesh.num_devices=0",
  "--config.mesh.fsdp=-1",
  "--config.checkpoint.every_steps=1000",
  "--config.checkpoint.max_to_keep=5",
  "--config.log.tensorboard=false",
)
TIMEOUT_S = 240


def worker(workdir: str, port: int, process_id: int, steps: int) -> int:
  import jax

  jax.config.update("jax_num_cpu_devices", 1)
  from neo_jax.cli import main
  from neo_jax.trainer import loop

  call_hooks = loop.Trainer._call_hooks

  def slow_hooks(self, info):  # time for a signal to land mid-run
    time.sleep(STEP_SLEEP_S)
    return call_hooks(self, info)

  loop.Trainer._call_hooks = slow_hooks
  return main(
    [
      "train",
      "--config",
      CONFIG,
      "--coordinator",
      f"127.0.0.1:{port}",
      "--num-processes",
      "2",
      "--process-id",
      str(process_id),
      f"--config.workdir={workdir}",
      f"--config.total_steps={steps}",
      *OVERRIDES,
    ]
  )


# --- the test side ------------------------------------------------------------------------------


def _records(workdir: Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _launch(workdir: Path, log_dir: Path, name: str, signals=(), env_extra=None):
  """Starts two processes; `signals` = [(process, signal, delay after the previous one)],
  the first sent once process 0 has logged a random step. Returns (return codes, logs)."""
  port = _free_port()
  env = _env(**(env_extra or {}))
  procs, logs = [], []
  for pid in range(2):
    log = open(log_dir / f"{name}_p{pid}.log", "w")
    logs.append(log)
    procs.append(
      subprocess.Popen(
        [sys.executable, __file__, str(workdir), str(port), str(pid), str(STEPS)],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    )
  deadline = time.monotonic() + TIMEOUT_S
  try:
    if signals:
      logged = len(_records(workdir))
      target = logged + random.randint(3, 8)
      while len(_records(workdir)) < target:
        assert all(p.poll() is None for p in procs), "a process ended before the signal"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
      for pid, sig, delay in signals:
        time.sleep(delay)
        procs[pid].send_signal(sig)
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p, log in zip(procs, logs):
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
  texts = [(log_dir / f"{name}_p{pid}.log").read_text() for pid in range(2)]
  return [p.returncode for p in procs], texts


def _stopped_at(text: str) -> int:
  found = re.findall(r"neo-jax train: stopped by (SIG\w+) at step (\d+); checkpoint saved", text)
  assert len(found) == 1, text[-3000:]
  return int(found[0][1])


def _steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _losses(workdir: Path) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in _records(workdir)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
  """The uninterrupted run every interrupted sequence must reproduce."""
  root = tmp_path_factory.mktemp("preemption")
  codes, texts = _launch(root / "straight", root, "straight")
  assert codes == [0, 0], texts[0][-3000:] + texts[1][-3000:]
  assert len(_losses(root / "straight")) == STEPS
  return root / "straight"


def _interrupt_and_finish(run: Path, logs: Path, launches, straight: Path) -> None:
  """Each launch [(name, [(process, signal, delay)], env)] must stop both processes after
  the same step and save it once; then a last launch finishes, and all the losses together
  are the uninterrupted run's, bit for bit."""
  stops = []
  for name, signals, env in launches:
    codes, texts = _launch(run, logs, name, signals, env)
    expected = {128 + signal.SIGTERM} | {128 + sig for _, sig, _ in signals}
    assert set(codes) <= expected, (name, codes, texts[0][-3000:], texts[1][-3000:])
    at = [_stopped_at(t) for t in texts]
    assert at[0] == at[1], (name, at)  # the same step on both processes
    assert 0 < at[0] < STEPS and (not stops or at[0] > stops[-1]), (name, at, stops)
    stops.append(at[0])
    assert _steps(run) == stops, (name, _steps(run))  # the stop saved that step, once
    gathered = "agree on stopping by a collective" in texts[0]
    assert gathered == bool(env), name
  codes, texts = _launch(run, logs, "last")
  assert codes == [0, 0], texts[0][-3000:]
  assert _steps(run) == stops + [STEPS]
  assert _losses(run) == _losses(straight)


def test_sigterm_to_one_then_to_both_stops_all_after_the_same_step(straight, tmp_path):
  """JAX's preemption service decides: SIGTERM to one process; after resuming, SIGTERM to
  both a second apart."""
  _interrupt_and_finish(
    tmp_path / "run",
    tmp_path,
    [
      ("one", [(1, signal.SIGTERM, 0.0)], None),
      ("both", [(0, signal.SIGTERM, 0.0), (1, signal.SIGTERM, 1.0)], None),
    ],
    straight,
  )


@pytest.mark.slow
def test_sighup_without_the_preemption_service_stops_all_after_the_same_step(straight, tmp_path):
  """With JAX's preemption service off the processes gather their flags after each update."""
  _interrupt_and_finish(
    tmp_path / "run",
    tmp_path,
    [("gather", [(1, signal.SIGHUP, 0.0)], {"JAX_ENABLE_PREEMPTION_SERVICE": "false"})],
    straight,
  )


if __name__ == "__main__":
  sys.exit(worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
