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
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from neo_jax.config import preset  # noqa: E402
from neo_jax.data.synthetic import SyntheticSpec, compact_vocab, synthetic_batch  # noqa: E402
from neo_jax.model import abstract_params  # noqa: E402
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


def depth_overrides(layers: int) -> dict:
  """NeoConfig overrides for `layers` layers (half of them pre-Buffer); 0 keeps the preset."""
  return dict(num_hidden_layers=layers, num_prebuffer_layers=layers // 2) if layers else {}


def model_config(
  model: str,
  *,
  layers: int = 0,
  vocab: int = 0,
  dtype: str = "float32",
  remat: str = "none",
  attention: str = "xla",
):
  """The preset with fp32 master weights, `dtype` compute and the given depth."""
  cfg = preset(
    model,
    dtype=dtype,
    param_dtype="float32",
    remat_policy=remat,
    attention_impl=attention,
    **depth_overrides(layers),
  )
  return compact_vocab(cfg, vocab) if vocab else cfg


@dataclasses.dataclass
class Bench:
  """A sharded train state and what the step needs; `state` advances with every step run."""

  cfg: Any
  mesh: Any
  trainable: set
  tx: Any
  schedule: Any
  state: Any


def prepare(
  cfg, stage: str = "sft", mesh_shape: tuple[int, int, int] = (1, -1, 1), seed: int = 0
) -> Bench:
  mesh = make_mesh(*mesh_shape)
  trainable = O.trainable_paths(abstract_params(cfg), O.stage_patterns(stage))
  tx = O.adamw()
  schedule = O.learning_rate_schedule(1e-4, 1000, warmup=10)
  state = init_state(cfg, tx, trainable, mesh, seed=seed)
  return Bench(cfg, mesh, trainable, tx, schedule, state)


def peak_memory() -> tuple[float, str]:
  """(bytes, basis): the device allocator's peak, or the process's peak RSS where none."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get("peak_bytes_in_use") is not None:
    return float(stats["peak_bytes_in_use"]), "device allocator"
  return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "host peak RSS"


def program_bytes(compiled) -> float | None:
  """Device bytes one call of a compiled step holds at its peak (arguments + outputs - donated
  + temporaries), from XLA's memory analysis; None where the backend gives none."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return float(
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )


def measure(
  bench: Bench,
  *,
  batch: int,
  seq_len: int,
  visual: int,
  image_tokens: tuple[int, int],
  k: int,
  chunk: int,
  loss_remat: bool = True,
  vocab_chunk: int = 0,
  accum: int = 1,
  steps: int = 10,
  peaks: dict[str, float] | None = None,
  max_bytes: float | None = None,
) -> dict:
  """Compiles the step for these rows, runs one step, then times `steps` steps (median).

  `peaks` maps a label to peak FLOP/s per device; MFU is reported against each. A step whose
  compiled program needs more than `max_bytes` of device memory is not run (`skipped`).
  """
  cfg, mesh = bench.cfg, bench.mesh
  spec = SyntheticSpec.for_model(
    cfg,
    batch_size=batch,
    seq_len=seq_len,
    visual_tokens=visual,
    min_image_tokens=image_tokens[0],
    max_image_tokens=image_tokens[1],
    text_vocab=min(cfg.vocab_size - 8, 4096),
  )
  step = make_train_step(
    next_token_loss(
      cfg, chunk=chunk, positions_per_row=k, remat=loss_remat, vocab_chunk=vocab_chunk
    ),
    bench.tx,
    bench.schedule,
    bench.trainable,
    grad_accum_steps=accum,
  )
  batches = [synthetic_batch(spec, i) for i in range(min(steps, 4))]
  run = compile_step(
    step,
    mesh,
    state_shardings(cfg, bench.tx, bench.trainable, mesh),
    batch_shardings(batches[0], mesh),
  )
  first_batch = shard_batch(batches[0], mesh)
  t = time.perf_counter()
  compiled = run.lower(bench.state, first_batch).compile()
  compile_s = time.perf_counter() - t
  need = program_bytes(compiled)
  base = {
    "device": f"{mesh.devices.size} x {jax.devices()[0].device_kind}",
    "layers": cfg.num_hidden_layers,
    "batch": batch,
    "seq_len": seq_len,
    "remat": cfg.remat_policy,
    "attention": cfg.attention_impl,
    "compile_s": round(compile_s, 2),
    "program_memory_gb": None if need is None else round(need / 2**30, 3),
  }
  if max_bytes is not None and need is not None and need > max_bytes:
    return dict(
      base,
      skipped=f"needs {need / 2**30:.1f} GiB of device memory, {max_bytes / 2**30:.1f} GiB usable",
    )
  t = time.perf_counter()
  bench.state, m = compiled(bench.state, first_batch)
  jax.block_until_ready(m)
  first = time.perf_counter() - t
  times, flops, tokens = [], [], []
  for i in range(steps):
    b = batches[i % len(batches)]
    sharded = shard_batch(b, mesh)
    t = time.perf_counter()
    bench.state, m = compiled(bench.state, sharded)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
    flops.append(M.step_flops(cfg, b, bench.trainable, k)["total"])
    tokens.append(float((b["segment_ids"] != 0).sum()))
  step_s = statistics.median(times)
  n_dev = mesh.devices.size
  model_flops = statistics.mean(flops)
  per_device = model_flops / step_s / n_dev
  mem, mem_basis = peak_memory()
  return dict(
    base,
    hidden=cfg.hidden_size,
    vocab=cfg.vocab_size,
    visual=visual,
    k=k,
    chunk=chunk,
    vocab_chunk=vocab_chunk,
    dtype=cfg.dtype,
    first_step_s=round(compile_s + first, 2),
    step_s=round(step_s, 4),
    steps=steps,
    tokens_per_s=round(statistics.mean(tokens) / step_s, 1),
    row_fill=round(statistics.mean(tokens) / (batch * seq_len), 3),
    model_tflops_per_step=round(model_flops / 1e12, 4),
    tflops_per_s_per_device=round(per_device / 1e12, 4),
    mfu={label: round(per_device / peak, 4) for label, peak in (peaks or {}).items()},
    peak_memory_gb=round(mem / 2**30, 3),
    memory_basis=mem_basis,
    loss=round(float(m["loss"]), 4),
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="tiny", help="NeoConfig preset: tiny | neo_2b | neo_9b")
  p.add_argument(
    "--layers",
    type=int,
    default=0,
    help="reduce depth to this many layers (half pre-Buffer); 0 keeps the preset",
  )
  p.add_argument("--vocab", type=int, default=0, help="compact vocabulary size (0: the preset's)")
  p.add_argument("--stage", default="sft", choices=sorted(O.STAGE_TRAINABLE))
  p.add_argument("--batch", type=int, default=8, help="global rows per step")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--visual", type=int, default=64, help="visual-token budget per row")
  p.add_argument("--image-tokens", default="4,16", help="min,max visual tokens per image")
  p.add_argument("--k", type=int, default=48, help="loss positions per row (0: all)")
  p.add_argument("--chunk", type=int, default=32, help="cross-entropy chunk (positions)")
  p.add_argument("--loss-remat", type=int, default=1, help="recompute logits chunks in backward")
  p.add_argument(
    "--vocab-chunk",
    type=int,
    default=0,
    help="stream the head over this many vocabulary entries (0: all at once)",
  )
  p.add_argument("--accum", type=int, default=1)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  p.add_argument("--attention", default="xla")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--json", default="", help="append the result as one JSON line to this file")
  args = p.parse_args(argv)

  cfg = model_config(
    args.model,
    layers=args.layers,
    vocab=args.vocab,
    dtype=args.dtype,
    remat=args.remat,
    attention=args.attention,
  )
  bench = prepare(cfg, args.stage, tuple(int(x) for x in args.mesh.split(",")))
  kind = jax.devices()[0].device_kind
  peak = M.peak_flops_per_device(kind)
  label = "vendor peak"
  if peak is None:
    peak, label = gemm_peak(), "float32 gemm peak (measured)"
  lo, hi = (int(x) for x in args.image_tokens.split(","))
  r = measure(
    bench,
    batch=args.batch,
    seq_len=args.seq_len,
    visual=args.visual,
    image_tokens=(lo, hi),
    k=args.k,
    chunk=args.chunk,
    loss_remat=bool(args.loss_remat),
    vocab_chunk=args.vocab_chunk,
    accum=args.accum,
    steps=args.steps,
    peaks={label: peak},
  )
  result = {
    "date": datetime.date.today().isoformat(),
    "machine": platform.node(),
    "cpus": os.cpu_count(),
    "jax": jax.__version__,
    "model": args.model,
    "stage": args.stage,
    **{key: r[key] for key in r if key != "mfu"},
    "mfu": r["mfu"][label],
    "mfu_basis": label,
    "peak_tflops_per_device": round(peak / 1e12, 3),
  }
  print(json.dumps(result))
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(result) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
