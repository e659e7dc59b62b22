"""Per-step cost of the stop decision every process must agree on (neo_jax/trainer/loop.py).

    .venv/bin/python benchmarks/stop_decision.py [--steps 2000]

Two processes (one CPU device each, jax.distributed over localhost, gloo) time, per update:

  jax      `reached_preemption_sync_point(step)`: what the trainer calls with JAX's preemption
           service on (the default); a local check until a preemption notice arrives
  gather   `process_allgather` of each process's flag: the fallback without that service, one
           small collective per update
  gather/N the same every N updates (a stop then waits up to N - 1 more updates)

and the median and 99th percentile of each, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(port: int, pid: int, steps: int, out: str) -> int:
  import jax
  import numpy as np

  jax.config.update("jax_num_cpu_devices", 1)
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
  from jax.experimental import multihost_utils

  def timed(fn, n):
    samples = []
    for i in range(1, n + 1):
      t0 = time.perf_counter()
      fn(i)
      samples.append(time.perf_counter() - t0)
    return samples

  flag = np.int32(0)
  timed(lambda i: multihost_utils.process_allgather(flag), 20)  # compile, warm up
  results = {
    "jax": timed(lambda i: multihost_utils.reached_preemption_sync_point(i), steps),
    "gather": timed(lambda i: multihost_utils.process_allgather(flag), steps),
  }
  summary = {
    k: {"median_us": float(np.median(v)) * 1e6, "p99_us": float(np.percentile(v, 99)) * 1e6}
    for k, v in results.items()
  }
  with open(out, "w") as f:
    json.dump(summary, f)
  return 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000)
  args = parser.parse_args()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  outs = [f"/tmp/stop_decision_{os.getpid()}_{pid}.json" for pid in (0, 1)]
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, "worker", str(port), str(pid), str(args.steps), outs[pid]], env=env
    )
    for pid in (0, 1)
  ]
  if any(p.wait() for p in procs):
    return 1
  rows = [json.loads(Path(o).read_text()) for o in outs]
  print(f"{args.steps} updates, 2 processes x 1 CPU device (gloo), per update:")
  for name in ("jax", "gather"):
    med = max(r[name]["median_us"] for r in rows)
    p99 = max(r[name]["p99_us"] for r in rows)
    print(f"  {name:7s} median {med:9.1f} us   p99 {p99:9.1f} us")
  med = max(r["gather"]["median_us"] for r in rows)
  for n in (10, 100):
    print(f"  gather/{n:<3d} {med / n:9.1f} us per update (a stop waits up to {n - 1} more)")
  return 0


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "worker":
    sys.exit(worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
  sys.exit(main())
