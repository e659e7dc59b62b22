"""The LM head's three matmuls in XLA:CPU and in PyTorch, against each one's 2048^3 GEMM.

    .venv/bin/python benchmarks/head_gemms.py --L 1024 2048 --repeats 5

A training step of the 177.5M NEO of benchmarks/train_step_vs_torch.py spends most of its
FLOPs in three float32 matmuls with the [512, 151,936] head: logits = h W, d h = d W^T and
d W = h^T d (2 L 512 151,936 FLOPs each). This times them alone, in one process, jax and
torch alternately on `--threads` threads, with a square 2048^3 matmul as each framework's
practical peak, so the head's share of a step can be compared with what the matmul engines
deliver. (The XLA:CPU dot runtime can be switched with XLA_FLAGS, e.g.
--xla_cpu_use_xnnpack=false for Eigen, --xla_cpu_use_onednn=true for oneDNN.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import train_step_vs_torch as vs  # noqa: E402

HIDDEN, VOCAB = 512, 151936


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--L", type=int, nargs="+", default=[1024, 2048], dest="lengths")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)

  vs.pin_threads(args.threads)
  vs.set_xla_cpu_threads(args.threads)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  shapes = [("gemm 2048^3", "mk,kn->mn", (2048, 2048), (2048, 2048))]
  for length in args.lengths:
    shapes += [
      (f"L={length} logits = h W", "mk,kn->mn", (length, HIDDEN), (HIDDEN, VOCAB)),
      (f"L={length} dh = d W^T", "mn,kn->mk", (length, VOCAB), (HIDDEN, VOCAB)),
      (f"L={length} dW = h^T d", "mk,mn->kn", (length, HIDDEN), (length, VOCAB)),
    ]
  print(
    f"{args.threads} threads, jax {jax.__version__}, torch {torch.__version__}, "
    f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}, load average {os.getloadavg()[0]:.2f}\n"
  )
  print(
    "| matmul | GFLOP | jax s (GFLOP/s, % of its 2048^3) | torch s (GFLOP/s, % of its 2048^3) |"
  )
  print("|---|---|---|---|")
  peak = {}
  for name, eq, sa, sb in shapes:
    a = rng.standard_normal(sa, dtype=np.float32)
    b = rng.standard_normal(sb, dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    f = jax.jit(lambda x, y, eq=eq: jnp.einsum(eq, x, y))
    f(ja, jb).block_until_ready()
    torch.einsum(eq, ta, tb)
    times = {"jax": [], "torch": []}
    for _ in range(args.repeats):  # alternately
      t = time.perf_counter()
      f(ja, jb).block_until_ready()
      times["jax"].append(time.perf_counter() - t)
      t = time.perf_counter()
      torch.einsum(eq, ta, tb)
      times["torch"].append(time.perf_counter() - t)
    lhs, rhs = eq.split("->")[0].split(",")
    sizes = dict(zip(lhs, sa)) | dict(zip(rhs, sb))
    flops = 2.0 * np.prod(list(sizes.values()))
    cells = []
    for fw in ("jax", "torch"):
      s = statistics.median(times[fw])
      rate = flops / s
      peak.setdefault(fw, rate)
      cells.append(f"{s:.3f} ({rate / 1e9:.0f}, {rate / peak[fw]:.0%})")
    print(f"| {name} | {flops / 1e9:.1f} | " + " | ".join(cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
