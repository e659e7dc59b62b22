"""What this machine allows for the step of train_step_vs_torch.py: its GEMM-bound time and
memory floor, against the measured PyTorch step.

    .venv/bin/python benchmarks/step_bound.py --L 1024 2048 --threads 2 --repeats 7 \\
        --results benchmarks/results/2026-11-30-cpu-train-step-vs-torch.json \\
        --rss-results benchmarks/results/2026-11-30-cpu-train-step-vs-torch-loaded.json

Time: every matmul the step must do, at the speed XLA:CPU reaches on this machine for that
matmul's shape (measured here, `--threads` threads): the LM head over all L positions (logits,
d hidden, d head), the projections and MLP of every layer (forward, d input, d weight; the
table of `neo_jax.trainer.flops.layer_matmuls`), attention's QK^T and PV over the key blocks
`xla_flash` visits (causal and per-image block skipping, at its block size; backward: dP, dQ,
dK, dV; the recomputed QK^T of a flash backward is listed apart) and the rest of the model
FLOPs (vision) at the 2048^3 speed. Nothing else (softmax, norms, the optimizer) is counted,
so the bound is below any real step. "fits 1.5x" compares it with the measured PyTorch step
/ 1.5. Memory: the floor of a fwd+bwd step is what the process holds before it (runtime,
parameters, inputs, executables: measured by the benchmark) plus gradients the size of the
parameters, against half of PyTorch's peak.

Each speed is the fastest of `--repeats` runs, listed with the threads busy in it (CPU / wall
seconds): on a shared machine a speed measured with fewer than `--threads` threads busy is the
other load's, not the hardware's; `--results` can come from a quieter run than this one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import train_step_vs_torch as vs  # noqa: E402

SMALL_GFLOP = 0.5  # shapes below this run STACK times in a loop, on distinct operands
STACK = 32


class Rate(NamedTuple):
  wall: float  # FLOP/s of the fastest repeat
  threads_busy: float  # CPU seconds / wall seconds of that repeat


def gemm_rate(eq: str, shape_a: tuple, shape_b: tuple, repeats: int) -> Rate:
  """Speed of one float32 einsum of these shapes under jit."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  flops = _flops(eq, shape_a, shape_b)
  rng = np.random.default_rng(0)
  n = STACK if flops < SMALL_GFLOP * 1e9 else 1
  a = jnp.asarray(rng.standard_normal((n, *shape_a), dtype=np.float32))
  b = jnp.asarray(rng.standard_normal((n, *shape_b), dtype=np.float32))
  out_shape = jax.eval_shape(lambda x, y: jnp.einsum(eq, x[0], y[0]), a, b).shape

  @jax.jit
  def f(a, b):  # distinct operands per iteration: XLA cannot hoist the product out of the loop
    body = lambda i, acc: acc + jnp.einsum(eq, a[i], b[i])
    return jax.lax.fori_loop(0, n, body, jnp.zeros(out_shape, jnp.float32))

  jax.block_until_ready(f(a, b))
  best, busy = float("inf"), 0.0
  for _ in range(repeats):
    t, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(f(a, b))
    wall = time.perf_counter() - t
    if wall < best:
      best, busy = wall, (time.process_time() - cpu) / wall
  return Rate(n * flops / best, busy)


def visited_blocks(length: int, data: str, block: int) -> tuple[int, float]:
  """(key blocks xla_flash visits summed over query blocks, allowed pairs) of the row."""
  import numpy as np

  from neo_jax.convert.hf_inputs import hf_inputs_to_batch
  from neo_jax.ops import flash_common as fc
  from neo_jax.ops import masks
  from neo_jax.positions import image_ids
  from neo_jax.trainer.flops import attention_pairs

  config = vs.model_config()
  inputs = vs.load_inputs(data, length)
  batch = hf_inputs_to_batch(inputs["input_ids"], inputs["pixel_values"], inputs["grid_hw"], config)
  seg = np.asarray(batch["segment_ids"])
  img = image_ids(
    np.asarray(batch["input_ids"]), batch["positions"][:, 0], config.img_context_token_id
  )
  ids = masks.self_attention_ids(seg, np.asarray(img))
  tables = fc.tables_for(ids, fc.round_up(length, block), block, block)
  qb = np.asarray(tables.q_blocks)[0]
  visits = (qb[:, masks.QB_VISIT1_HI] - qb[:, masks.QB_VISIT1_LO]).clip(0) + (
    qb[:, masks.QB_VISIT2_HI] - qb[:, masks.QB_VISIT2_LO]
  ).clip(0)
  return int(visits.sum()), float(attention_pairs(seg, np.asarray(img)).sum())


def step_work(length: int, data: str, block: int) -> dict:
  """The step's matmuls: {part: [(pass, eq, shape_a, shape_b, count)]} and other FLOPs."""
  from neo_jax.convert.hf_inputs import hf_inputs_to_batch
  from neo_jax.trainer.flops import layer_matmuls, step_flops

  cfg = vs.model_config()
  d, v, n = cfg.hidden_size, cfg.vocab_size, length
  work = {
    "head": [
      ("fwd", "mk,kn->mn", (n, d), (d, v), 1),
      ("bwd", "mn,kn->mk", (n, v), (d, v), 1),
      ("bwd", "mk,mn->kn", (n, d), (n, v), 1),
    ],
    "layers": [],
    "attention": [],
    "attention recompute": [],
  }
  for i, o in layer_matmuls(cfg).values():
    work["layers"] += [
      ("fwd", "mi,io->mo", (n, i), (i, o), cfg.num_hidden_layers),
      ("bwd", "mo,io->mi", (n, o), (i, o), cfg.num_hidden_layers),
      ("bwd", "mi,mo->io", (n, i), (n, o), cfg.num_hidden_layers),
    ]
  blocks, pairs = visited_blocks(length, data, block)
  hkv, g = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
  r, dqk, dv = g * block, cfg.qk_head_dim, cfg.head_dim
  per = blocks * cfg.num_hidden_layers
  work["attention"] = [  # one batched dot over kv heads per visited block, as xla_flash runs
    ("fwd", "hrd,hkd->hrk", (hkv, r, dqk), (hkv, block, dqk), per),
    ("fwd", "hrk,hkd->hrd", (hkv, r, block), (hkv, block, dv), per),
    ("bwd", "hrd,hkd->hrk", (hkv, r, dv), (hkv, block, dv), per),
    ("bwd", "hrk,hkd->hrd", (hkv, r, block), (hkv, block, dqk), per),
    ("bwd", "hrk,hrd->hkd", (hkv, r, block), (hkv, r, dqk), per),
    ("bwd", "hrk,hrd->hkd", (hkv, r, block), (hkv, r, dv), per),
  ]
  work["attention recompute"] = [("bwd", *work["attention"][0][1:])]
  inputs = vs.load_inputs(data, length)
  batch = hf_inputs_to_batch(inputs["input_ids"], inputs["pixel_values"], inputs["grid_hw"], cfg)
  model = step_flops(cfg, batch)
  counted = {"fwd": 0.0, "bwd": 0.0}
  for part in ("head", "layers"):
    for pass_, eq, sa, sb, count in work[part]:
      counted[pass_] += count * _flops(eq, sa, sb)
  attn_fwd = 2.0 * (dqk + dv) * cfg.num_attention_heads * pairs * cfg.num_hidden_layers
  other_fwd = model["forward"] - counted["fwd"] - attn_fwd
  other_bwd = model["backward"] - counted["bwd"] - 2 * attn_fwd
  return {
    "work": work,
    "other": {"fwd": other_fwd, "bwd": other_bwd},
    "visited_blocks": blocks,
    "attention_pairs": pairs,
    "model_flops": model,
  }


def _flops(eq: str, shape_a: tuple, shape_b: tuple) -> float:
  lhs, rhs = eq.split("->")[0].split(",")
  sizes = dict(zip(lhs, shape_a)) | dict(zip(rhs, shape_b))
  out = 2.0
  for s in sizes.values():
    out *= s
  return out


def _fits(allowed_s: float, row: dict) -> str:
  """Whether the bound at shape speeds (and at the 2048^3 speed) leaves the step `allowed_s`."""
  yes = lambda bound: "yes" if bound <= allowed_s else "no"
  return f"{yes(row['bound_s'])} ({yes(row['bound_at_peak_s'])})"


def load_results(path: str) -> dict:
  """(L, pass) -> {impl: entry} of a train_step_vs_torch.py --json file."""
  if not path:
    return {}
  with open(path) as f:
    results = json.load(f)["results"]
  return {(r["L"], r["pass"]): {i["impl"]: i for i in r["impls"]} for r in results}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--L", type=int, nargs="+", default=[1024, 2048], dest="lengths")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--block", type=int, default=0, help="xla_flash block (default: its own)")
  p.add_argument(
    "--results", default="", help="train_step_vs_torch.py --json output: step times, peak RSS"
  )
  p.add_argument(
    "--rss-results",
    default="",
    help="another run's --json for the peak RSS and the RSS before the step (default: --results)",
  )
  p.add_argument("--target", type=float, default=1.5, help="speed goal against torch")
  p.add_argument("--data", default="", help="weights/inputs folder (default: a temp dir)")
  p.add_argument("--json", default="", help="write the bound here")
  args = p.parse_args(argv)

  vs.pin_threads(args.threads)
  vs.set_xla_cpu_threads(args.threads)
  import jax

  from neo_jax.model import NeoModel
  from neo_jax.ops import xla_flash

  block = args.block or xla_flash.DEFAULT_BLOCK
  data = args.data or tempfile.mkdtemp(prefix="neo_bound_")
  os.makedirs(data, exist_ok=True)
  measured = load_results(args.results)
  rss_measured = load_results(args.rss_results or args.results)
  load = os.getloadavg()[0]
  peak_rate = gemm_rate("mk,kn->mn", (2048, 2048), (2048, 2048), args.repeats)
  peak = peak_rate.wall
  rates: dict[tuple, Rate] = {}
  rows = []
  for length in args.lengths:
    vs.make_data(data, length)
    w = step_work(length, data, block)
    for pass_ in ("fwd", "fwdbwd"):
      passes = ("fwd",) if pass_ == "fwd" else ("fwd", "bwd")
      row = {"L": length, "pass": pass_, "gflop": {}, "seconds": {}}
      for part, items in w["work"].items():
        flops = seconds = 0.0
        for p_, eq, sa, sb, count in items:
          if p_ not in passes:
            continue
          key = (eq, sa, sb)
          if key not in rates:
            rates[key] = gemm_rate(eq, sa, sb, args.repeats)
          work = count * _flops(eq, sa, sb)
          flops += work
          seconds += work / rates[key].wall
        row["gflop"][part], row["seconds"][part] = flops / 1e9, seconds
      other = sum(w["other"][p_] for p_ in passes)
      row["gflop"]["other"], row["seconds"]["other"] = other / 1e9, other / peak
      needed = [k for k in row["seconds"] if k != "attention recompute"]
      row["bound_s"] = sum(row["seconds"][k] for k in needed)
      row["bound_at_peak_s"] = sum(row["gflop"][k] for k in needed) * 1e9 / peak
      row["visited_blocks"], row["attention_pairs"] = w["visited_blocks"], w["attention_pairs"]
      m, m_rss = measured.get((length, pass_), {}), rss_measured.get((length, pass_), {})
      if "torch" in m:
        row["torch_s"] = m["torch"]["median_s"]
      if "jax" in m:
        row["jax_s"] = m["jax"]["median_s"]
      if "torch" in m_rss and "jax" in m_rss:
        row["torch_peak_rss_gib"] = m_rss["torch"]["peak_rss_gib"]
        row["jax_peak_rss_gib"] = m_rss["jax"]["peak_rss_gib"]
        row["jax_rss_before_gib"] = m_rss["jax"].get("rss_before_step_gib")
      rows.append(row)

  config = vs.model_config()
  shapes = jax.eval_shape(lambda: NeoModel(config).init(jax.random.key(0), *_dummy_inputs(config)))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  print(
    f"{args.threads} threads, jax {jax.__version__}, 2048^3 GEMM {peak / 1e9:.0f} GFLOP/s "
    f"({peak_rate.threads_busy:.1f} threads busy), "
    f"xla_flash block {block}, load average {load:.2f} before / {os.getloadavg()[0]:.2f} after\n"
  )
  print("matmul speeds (GFLOP/s of the fastest repeat, threads busy in it):")
  for (eq, sa, sb), rate in rates.items():
    print(f"  {eq:14s} {str(sa):20s} {str(sb):20s} {rate.wall / 1e9:6.0f} {rate.threads_busy:5.1f}")
  print(
    "\n| L | pass | GFLOP head / layers / attention (+ recompute) / other "
    "| bound s at shape speeds (at 2048^3) | torch s | jax s "
    f"| torch / bound | {args.target}x needs s | fits (at 2048^3) |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    g = r["gflop"]
    torch_s = r.get("torch_s")
    cells = [
      str(r["L"]),
      r["pass"],
      f"{g['head']:.0f} / {g['layers']:.0f} / {g['attention']:.0f} "
      f"(+{g['attention recompute']:.0f}) / {g['other']:.1f}",
      f"{r['bound_s']:.2f} ({r['bound_at_peak_s']:.2f})",
      f"{torch_s:.2f}" if torch_s else "-",
      f"{r['jax_s']:.2f}" if r.get("jax_s") else "-",
      f"{torch_s / r['bound_s']:.2f}x" if torch_s else "-",
      f"{torch_s / args.target:.2f}" if torch_s else "-",
      _fits(torch_s / args.target, r) if torch_s else "-",
    ]
    print("| " + " | ".join(cells) + " |")
  print(f"\nparameters {param_bytes / 2**30:.3f} GiB (gradients the same)")
  print(
    "| L | torch peak GiB | half of it | jax before the step | + gradients = floor | jax peak |"
  )
  print("|---|---|---|---|---|---|")
  for r in rows:
    if r["pass"] != "fwdbwd" or "torch_peak_rss_gib" not in r:
      continue
    before = r.get("jax_rss_before_gib")
    floor = f"{before + param_bytes / 2**30:.2f}" if before else "-"
    cells = [
      str(r["L"]),
      f"{r['torch_peak_rss_gib']:.2f}",
      f"{r['torch_peak_rss_gib'] / 2:.2f}",
      f"{before:.2f}" if before else "-",
      floor,
      f"{r['jax_peak_rss_gib']:.2f}" if r.get("jax_peak_rss_gib") else "-",
    ]
    print("| " + " | ".join(cells) + " |")
  if args.json:
    out = {
      "gemm_2048_gflops": peak / 1e9,
      "block": block,
      "load_average": [load, os.getloadavg()[0]],
      "param_gib": param_bytes / 2**30,
      "speeds_gflops": [
        [eq, sa, sb, rate.wall / 1e9, rate.threads_busy] for (eq, sa, sb), rate in rates.items()
      ],
      "rows": rows,
    }
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


def _dummy_inputs(config):
  import jax.numpy as jnp

  ids = jnp.zeros((1, 8), jnp.int32)
  return ids, jnp.zeros((1, 3, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)


if __name__ == "__main__":
  sys.exit(main())
