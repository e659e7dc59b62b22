"""Training-step throughput: tokens/s, model TFLOP/s, MFU and peak memory.

    python benchmarks/train_step.py --model tiny                       # CPU, realistic tiny shapes
    python benchmarks/train_step.py --model neo_2b --layers 2 --seq-len 1024 --batch 1
    python benchmarks/train_step.py --model neo_2b --seq-len 16384 --remat full --dtype bfloat16

Synthetic packed batches (neo_jax.data.synthetic) with images; the real jitted step
(neo_jax.trainer.step) under a mesh over all devices. MFU divides the model FLOPs of
neo_jax.trainer.flops.step_flops by the device's vendor peak; on CPU, where no vendor figure
applies, by the measured throughput of a large float32 matmul on this machine (labelled
"gemm peak"). Peak memory is the device allocator's peak, or the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from neo_jax.config import preset  # noqa: E402
from neo_jax.model import abstract_params  # noqa: E402
from neo_jax.data.synthetic import SyntheticSpec, compact_vocab, synthetic_batch  # noqa: E402
from neo_jax.objectives.next_token import next_token_loss  # noqa: E402
from neo_jax.parallel import batch_shardings, make_mesh, shard_batch  # noqa: E402
from neo_jax.trainer import flops as M  # noqa: E402
from neo_jax.trainer import optimizer as O  # noqa: E402
from neo_jax.trainer.state import init_state, state_shardings  # noqa: E402
from neo_jax.trainer.step import compile_step, make_train_step  # noqa: E402


def gemm_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of an n x n x n matmul on device 0 (a practical peak where no vendor figure fits)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="tiny", help="NeoConfig preset: tiny | neo_2b | neo_9b")
  p.add_argument("--layers", type=int, default=0,
                 help="reduce depth to this many layers (half pre-Buffer); 0 keeps the preset")
  p.add_argument("--vocab", type=int, default=0, help="compact vocabulary size (0: the preset's)")
  p.add_argument("--stage", default="sft", choices=sorted(O.STAGE_TRAINABLE))
  p.add_argument("--batch", type=int, default=8, help="global rows per step")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--visual", type=int, default=64, help="visual-token budget per row")
  p.add_argument("--image-tokens", default="4,16", help="min,max visual tokens per image")
  p.add_argument("--k", type=int, default=48, help="loss positions per row (0: all)")
  p.add_argument("--chunk", type=int, default=32, help="cross-entropy chunk (positions)")
  p.add_argument("--loss-remat", type=int, default=1, help="recompute logits chunks in backward")
  p.add_argument("--vocab-chunk", type=int, default=0,
                 help="stream the head over this many vocabulary entries (0: all at once)")
  p.add_argument("--accum", type=int, default=1)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  p.add_argument("--attention", default="xla")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--json", default="", help="append the result as one JSON line to this file")
  args = p.parse_args(argv)

  overrides = dict(dtype=args.dtype, param_dtype="float32", remat_policy=args.remat,
                   attention_impl=args.attention)
  if args.layers:
    overrides.update(num_hidden_layers=args.layers, num_prebuffer_layers=args.layers // 2)
  cfg = preset(args.model, **overrides)
  if args.vocab:
    cfg = compact_vocab(cfg, args.vocab)
  lo, hi = (int(x) for x in args.image_tokens.split(","))
  spec = SyntheticSpec.for_model(cfg, batch_size=args.batch, seq_len=args.seq_len,
                                 visual_tokens=args.visual, min_image_tokens=lo,
                                 max_image_tokens=hi, text_vocab=min(cfg.vocab_size - 8, 4096))
  mesh = make_mesh(*(int(x) for x in args.mesh.split(",")))
  trainable = O.trainable_paths(abstract_params(cfg), O.stage_patterns(args.stage))
  tx = O.adamw()
  schedule = O.learning_rate_schedule(1e-4, 1000, warmup=10)
  state = init_state(cfg, tx, trainable, mesh, seed=0)
  step = make_train_step(next_token_loss(cfg, chunk=args.chunk, positions_per_row=args.k,
                                         remat=bool(args.loss_remat),
                                         vocab_chunk=args.vocab_chunk), tx,
                         schedule, trainable, grad_accum_steps=args.accum)
  batches = [synthetic_batch(spec, i) for i in range(min(args.steps, 4))]
  run = compile_step(step, mesh, state_shardings(cfg, tx, trainable, mesh),
                     batch_shardings(batches[0], mesh))
  t = time.perf_counter()
  state, m = run(state, shard_batch(batches[0], mesh))
  jax.block_until_ready(m)
  first = time.perf_counter() - t
  times, flops, tokens = [], [], []
  for i in range(args.steps):
    b = batches[i % len(batches)]
    sharded = shard_batch(b, mesh)
    t = time.perf_counter()
    state, m = run(state, sharded)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
    flops.append(M.step_flops(cfg, b, trainable, args.k)["total"])
    tokens.append(float((b["segment_ids"] != 0).sum()))
  step_s = statistics.median(times)
  n_dev = mesh.devices.size
  kind = jax.devices()[0].device_kind
  peak = M.peak_flops_per_device(kind)
  peak_label = "vendor peak"
  if peak is None:
    peak, peak_label = gemm_peak(), "float32 gemm peak (measured)"
  model_flops = statistics.mean(flops)
  stats = jax.local_devices()[0].memory_stats() or {}
  peak_mem = stats.get("peak_bytes_in_use")
  result = {
      "date": datetime.date.today().isoformat(), "machine": platform.node(),
      "device": f"{n_dev} x {kind}", "cpus": os.cpu_count(), "jax": jax.__version__,
      "model": args.model, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
      "vocab": cfg.vocab_size, "stage": args.stage, "batch": args.batch,
      "seq_len": args.seq_len, "visual": args.visual, "k": args.k, "chunk": args.chunk,
      "vocab_chunk": args.vocab_chunk,
      "dtype": args.dtype, "remat": args.remat, "first_step_s": round(first, 2),
      "step_s": round(step_s, 4), "tokens_per_s": round(statistics.mean(tokens) / step_s, 1),
      "model_tflops_per_step": round(model_flops / 1e12, 4),
      "tflops_per_s_per_device": round(model_flops / step_s / n_dev / 1e12, 4),
      "mfu": round(model_flops / step_s / n_dev / peak, 4), "mfu_basis": peak_label,
      "peak_tflops_per_device": round(peak / 1e12, 3),
      "peak_memory_gb": round((peak_mem if peak_mem is not None else
                               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                              / 2**30, 3),
      "memory_basis": "device allocator" if peak_mem is not None else "host peak RSS",
      "loss": round(float(m["loss"]), 4),
  }
  print(json.dumps(result))
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(result) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
