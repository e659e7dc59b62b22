"""The reductions over one head chunk's [chunk, V] float32 logits in XLA:CPU.

    .venv/bin/python benchmarks/head_reductions.py --chunk 512 --threads 2 --repeats 7

Besides its three matmuls (benchmarks/head_gemms.py) a head chunk reduces its logits over the
151,936-entry vocabulary: the row maximum, the sum of exp(logit - max) for the logsumexp, and
the predicted token for the accuracy metric. XLA:CPU runs jnp.argmax as one reduction of
(value, index) pairs, which is several times slower than a plain max; the training loss takes
`cross_entropy.blocked_argmax` instead (a max per block of entries, then argmax over the block
maxima and inside the winning block). This times each on random logits, checks that the two
argmaxes agree, and prints a table (median of `--repeats` calls after one warm-up).
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

VOCAB = 151936


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--chunk", type=int, default=512, help="positions per head chunk")
  p.add_argument("--vocab", type=int, default=VOCAB)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args(argv)

  vs.pin_threads(args.threads)
  vs.set_xla_cpu_threads(args.threads)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from neo_jax.objectives.cross_entropy import blocked_argmax

  logits = jax.random.normal(jax.random.key(0), (1, args.chunk, args.vocab)) * 3.0
  ops = {
    "max": lambda x: x.max(axis=-1),
    "jnp.argmax": lambda x: jnp.argmax(x, axis=-1),
    "blocked_argmax": blocked_argmax,
    "sum of exp(x - max)": lambda x: jnp.exp(x - x.max(axis=-1, keepdims=True)).sum(axis=-1),
    "exp(x - max), elementwise": lambda x: jnp.exp(x - x.max(axis=-1, keepdims=True)),
  }
  print(
    f"[{args.chunk}, {args.vocab}] float32, {args.threads} threads, jax {jax.__version__}, "
    f"load average {os.getloadavg()[0]:.2f}\n"
  )
  print("| op | ms (median) |")
  print("|---|---|")
  results = {}
  for name, fn in ops.items():
    f = jax.jit(fn)
    results[name] = jax.block_until_ready(f(logits))
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      jax.block_until_ready(f(logits))
      times.append(time.perf_counter() - t)
    print(f"| {name} | {statistics.median(times) * 1e3:.1f} |")
  same = np.array_equal(np.asarray(results["jnp.argmax"]), np.asarray(results["blocked_argmax"]))
  print(f"\nblocked_argmax equals jnp.argmax on every row: {same}")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
