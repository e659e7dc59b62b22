"""Does XLA:CPU run independent pieces of `xla_flash` attention on both cores?

    .venv/bin/python benchmarks/attention_concurrency.py --L 1024 2048 --threads 2 --repeats 3

`xla_flash`'s block matmuls are batched dots that XLA:CPU runs on one thread (benchmarks/
README.md, "What the hardware allows"). This times one layer's attention forward + backward
of the 177.5M NEO of benchmarks/train_step_vs_torch.py (8 query / 4 KV heads of width 64,
one row with a text prefix, an image of L / 4 tokens and text) as one call over all KV heads
and as 2 or 4 independent calls over groups of KV heads, concatenated: if the runtime ran
independent loops concurrently, the split would take less wall time and CPU time / wall time
would exceed 1. The loss and gradients of each split are compared with the one call's
(difference relative to the largest value of each: float32 rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import train_step_vs_torch as vs  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--L", type=int, nargs="+", default=[1024, 2048], dest="lengths")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4], help="KV-head groups")
  args = p.parse_args(argv)

  vs.pin_threads(args.threads)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from neo_jax.ops import xla_flash
  from neo_jax.ops.layouts import Span, ids_from_arrays, row_ids

  group = HEADS // KV_HEADS
  print(f"{args.threads} threads, jax {jax.__version__}, load {os.getloadavg()[0]:.2f}\n")
  print("| L | KV-head groups | wall s | CPU s | CPU / wall | relative difference to one call |")
  print("|---|---|---|---|---|---|")
  for length in args.lengths:
    image = length // 4
    row = row_ids([[Span(16), Span(image, image=True), Span(length - image - 16)]], length)
    ids = ids_from_arrays(*(np.stack([x]) for x in row))
    rng = np.random.default_rng(0)
    q, k, v, d_out = (
      jnp.asarray(rng.standard_normal((1, length, h, HEAD_DIM)), jnp.float32)
      for h in (HEADS, KV_HEADS, KV_HEADS, HEADS)
    )

    def attention(q, k, v, parts, ids=ids):
      kv = KV_HEADS // parts
      outs = [
        xla_flash.flash_attention(
          q[:, :, i * kv * group : (i + 1) * kv * group],
          k[:, :, i * kv : (i + 1) * kv],
          v[:, :, i * kv : (i + 1) * kv],
          ids,
          scale=HEAD_DIM**-0.5,
        )
        for i in range(parts)
      ]
      return jnp.concatenate(outs, axis=2)

    def loss(q, k, v, parts, d_out=d_out):
      return jnp.vdot(attention(q, k, v, parts), d_out)

    steps = {
      n: jax.jit(jax.value_and_grad(lambda q, k, v, n=n: loss(q, k, v, n), (0, 1, 2)))
      for n in args.parts
    }
    results = {n: jax.block_until_ready(f(q, k, v)) for n, f in steps.items()}
    first = jax.tree.leaves(results[args.parts[0]])
    times = {n: [] for n in steps}
    for _ in range(args.repeats):  # alternately
      for n, f in steps.items():
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(f(q, k, v))
        times[n].append((time.perf_counter() - wall, time.process_time() - cpu))
    for n in steps:
      wall, cpu = (min(t[i] for t in times[n]) for i in (0, 1))
      diff = max(
        float(jnp.abs(a - b).max() / jnp.abs(b).max())
        for a, b in zip(jax.tree.leaves(results[n]), first)
      )
      print(f"| {length} | {n} | {wall:.3f} | {cpu:.3f} | {cpu / wall:.2f} | {diff:.1e} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
