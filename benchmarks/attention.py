"""Attention kernels on NEO-like packed rows: time and TFLOP/s, forward and forward+backward.

    .venv/bin/python benchmarks/attention.py --tiny              # CPU, seconds (interpret mode)
    python benchmarks/attention.py                               # GPU / TPU: L = 4k, 8k, 16k
    python benchmarks/attention.py --lengths 8192 --impls pallas_gpu cudnn_causal --out r.json

Shapes are NEO-2B attention by default (16 query heads, 8 kv heads, query/key width 256, value
width 128, bf16), one packed row per call. Rows follow NEO's data: samples of a short prompt,
one 1-3k-token image and 100-1000 tokens of text, packed until the next one does not fit, the
rest padding (`--layout neo_pref` splits the text into a chosen and a rejected answer).

Implementations (each skipped where it cannot run):
  xla           dense XLA reference (materialises [L, L] scores; runs out of memory at 16k)
  xla_chunked   XLA reference one query chunk at a time
  pallas_tpu    our TPU kernel (interpret mode off TPU)
  pallas_gpu    our GPU kernel (interpret mode off GPU)
  cudnn_causal  jax.nn.dot_product_attention(implementation="cudnn", is_causal=True) on the
                same q, k and v with V zero-padded to the query width (cuDNN needs Dv == Dqk);
                plain causal, no segments: the yardstick for a dense causal flash kernel
  cudnn         the `cudnn` attention impl (ops/cudnn.py): packed segments, causal within each;
                text-only rows only (`--layout text`); XLA emulation off GPU

FLOPs: forward 2 * pairs * Hq * (Dqk + Dv); backward 2 * pairs * Hq * (3 Dqk + 2 Dv) (recompute
QK^T, dP, dV, dQ, dK). "useful" counts the (query, key) pairs the rule allows (from
`masks.num_allowed`), "dense" counts all L^2 pairs (what a kernel without skipping would do);
cudnn_causal counts its causal pairs L (L + 1) / 2 at its padded widths (Dv = Dqk).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from neo_jax.ops import cudnn, masks, pallas_gpu, pallas_tpu, reference  # noqa: E402
from neo_jax.ops.layouts import describe, ids_from_arrays, neo_row, row_ids, text_row  # noqa: E402

IMPLS = ("xla", "xla_chunked", "pallas_tpu", "pallas_gpu", "cudnn_causal", "cudnn")
MODES = ("fwd", "fwd+bwd")


def flops(pairs: float, hq: int, dqk: int, dv: int, mode: str) -> float:
  fwd = 2.0 * pairs * hq * (dqk + dv)
  return fwd if mode == "fwd" else fwd + 2.0 * pairs * hq * (3 * dqk + 2 * dv)


def build_row(
  length: int, seed: int, *, tiny: bool = False, preference: bool = False, text: bool = False
):
  """(samples, AttnIds [1, length]) of one NEO-like packed row (`text`: text-only samples);
  branch ids always present."""
  rng = np.random.default_rng(seed)
  if text:
    samples = text_row(rng, length, sample_len=(16, 64) if tiny else (100, 2000))
  elif tiny:
    samples = neo_row(
      rng,
      length,
      image_len=(32, 96),
      prompt_len=(4, 12),
      answer_len=(16, 64),
      preference=preference,
    )
  else:
    samples = neo_row(rng, length, preference=preference)
  seg, img, branch = row_ids(samples, length)
  return samples, ids_from_arrays(seg[None], img[None], branch[None])


def make_inputs(length: int, hq: int, hkv: int, dqk: int, dv: int, dtype, seed: int):
  """Random q, k, v and an output cotangent (never zeros) for one row."""
  keys = jax.random.split(jax.random.key(seed), 4)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
  return (
    normal(keys[0], (1, length, hq, dqk)),
    normal(keys[1], (1, length, hkv, dqk)),
    normal(keys[2], (1, length, hkv, dv)),
    normal(keys[3], (1, length, hq, dv)),
  )


def attention_fn(impl: str, scale: float, *, q_chunk: int = 1024, gpu_blocks=None, tpu_blocks=None):
  """fn(q, k, v, ids) -> out for `impl`; ids are an argument so rows of one length share a
  compiled program."""
  if impl == "xla":
    return lambda q, k, v, ids: reference.attention_dense(q, k, v, ids, scale=scale)
  if impl == "xla_chunked":
    return lambda q, k, v, ids: reference.attention_chunked(
      q, k, v, ids, scale=scale, q_chunk=q_chunk
    )
  if impl == "pallas_tpu":
    return lambda q, k, v, ids: pallas_tpu.flash_attention(
      q, k, v, ids, scale=scale, block_sizes=tpu_blocks
    )
  if impl == "pallas_gpu":
    return lambda q, k, v, ids: pallas_gpu.flash_attention(
      q, k, v, ids, scale=scale, block_sizes=gpu_blocks
    )
  if impl == "cudnn":
    return lambda q, k, v, ids: cudnn.attention(q, k, v, ids, scale=scale)
  if impl == "cudnn_causal":

    def fn(q, k, v, ids):
      del ids  # plain causal
      v_pad = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - v.shape[-1])])
      out = jax.nn.dot_product_attention(
        q, k, v_pad, scale=scale, is_causal=True, implementation="cudnn"
      )
      return out[..., : v.shape[-1]]

    return fn
  raise ValueError(impl)


def for_mode(fn, mode: str):
  """fwd: fn(q, k, v, ids); fwd+bwd: (q, k, v, ids, d_out) -> (out, (dq, dk, dv))."""
  if mode == "fwd":
    return fn

  def fwd_bwd(q, k, v, ids, d_out):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, ids), q, k, v)
    return out, vjp(d_out)

  return fwd_bwd


def impl_flops(
  impl: str, allowed: float, length: int, hq: int, dqk: int, dv: int, mode: str
) -> tuple[float, float]:
  """(useful, dense-equivalent) FLOPs of one call; cuDNN causal at its causal pairs and
  padded value width."""
  if impl == "cudnn_causal":
    return (
      flops(length * (length + 1) / 2, hq, dqk, dqk, mode),
      flops(float(length) ** 2, hq, dqk, dqk, mode),
    )
  return flops(allowed, hq, dqk, dv, mode), flops(float(length) ** 2, hq, dqk, dv, mode)


def runnable(impl: str, backend: str, tiny: bool) -> str | None:
  """None if `impl` can run here, else why not."""
  if impl == "cudnn_causal" and backend != "gpu":
    return "needs a GPU"
  if impl == "cudnn" and backend not in ("gpu", "cpu"):
    return "cuDNN (XLA emulation only on CPU)"
  if impl == "pallas_tpu" and backend not in ("tpu", "cpu"):
    return "TPU kernel (interpret mode only on CPU)"
  if impl == "pallas_gpu" and backend not in ("gpu", "cpu"):
    return "GPU kernel (interpret mode only on CPU)"
  if impl.startswith("pallas") and backend == "cpu" and not tiny:
    return "interpret mode: use --tiny on CPU"
  return None


class Timing(NamedTuple):
  compile_s: float  # lower + compile
  first_s: float  # first call after compiling
  median_s: float  # median of the timed calls (warm-up excluded)
  iters: int


def time_call(fn, args_, iters: int, warmup: int, max_s: float | None = None) -> Timing:
  """Compiles `fn` (jitted here unless it is already), then times calls with
  block_until_ready. `max_s` caps the timed loop (at least 3 calls)."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args_).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args_))
  first = time.perf_counter() - t0
  if max_s is not None:
    iters = max(3, min(iters, int(max_s / max(first, 1e-6))))
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args_))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args_))
    times.append(time.perf_counter() - t0)
  return Timing(compile_s, first, statistics.median(times), iters)


def run(args) -> dict:
  backend = jax.default_backend()
  dtype = jnp.dtype(args.dtype)
  hq, hkv, dqk, dv = args.heads, args.kv_heads, args.dqk, args.dv
  scale = args.scale if args.scale else (dv**-0.5)
  gpu_base, tpu_base = pallas_gpu.BlockSizes(), pallas_tpu.BlockSizes()
  gpu_blocks = pallas_gpu.BlockSizes(
    args.block_q or gpu_base.block_q,
    args.block_kv or gpu_base.block_kv,
    args.block_q_bwd or gpu_base.block_q_bwd,
    args.block_kv_bwd or gpu_base.block_kv_bwd,
  )
  tpu_blocks = pallas_tpu.BlockSizes(
    args.block_q or tpu_base.block_q, args.block_kv or tpu_base.block_kv
  )
  results = []
  for length in args.lengths:
    samples, ids = build_row(
      length,
      args.seed,
      tiny=args.tiny,
      preference=args.layout == "neo_pref",
      text=args.layout == "text",
    )
    allowed = int(masks.num_allowed(masks.kv_ranges(ids)).sum())
    q, k, v, d_out = make_inputs(length, hq, hkv, dqk, dv, dtype, args.seed)
    print(f"\nL={length}: {describe(samples)}")
    print(
      f"  allowed pairs {allowed:,} = {allowed / length**2:.3f} of L^2 "
      f"(causal would be {0.5 * (length + 1) / length:.3f})"
    )
    for impl in args.impls:
      why = runnable(impl, backend, args.tiny)
      for mode in args.modes:
        row = dict(impl=impl, mode=mode, length=length, allowed_pairs=allowed)
        if why:
          row["skipped"] = why
          results.append(row)
          continue
        fn = for_mode(
          attention_fn(
            impl, scale, q_chunk=args.q_chunk, gpu_blocks=gpu_blocks, tpu_blocks=tpu_blocks
          ),
          mode,
        )
        call_args = (q, k, v, ids) if mode == "fwd" else (q, k, v, ids, d_out)
        try:
          timing = time_call(fn, call_args, args.iters, args.warmup)
        except Exception as e:  # noqa: BLE001 - out of memory, unsupported shapes: recorded
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
          results.append(row)
          print(f"  {impl:13s} {mode:8s} error: {row['error']}")
          continue
        sec = timing.median_s
        useful, dense = impl_flops(impl, allowed, length, hq, dqk, dv, mode)
        row.update(
          seconds=sec,
          compile_seconds=timing.compile_s,
          useful_tflops=useful / sec / 1e12,
          dense_equiv_tflops=dense / sec / 1e12,
        )
        results.append(row)
        print(
          f"  {impl:13s} {mode:8s} {sec * 1e3:10.3f} ms   useful {row['useful_tflops']:8.3f}"
          f" TFLOP/s   dense-equiv {row['dense_equiv_tflops']:8.3f} TFLOP/s"
          f"   (compile {timing.compile_s:.1f} s)"
        )
  return dict(
    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    command=" ".join([os.path.basename(sys.executable)] + sys.argv),
    backend=backend,
    device=str(jax.devices()[0].device_kind),
    host=f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}",
    jax=jax.__version__,
    shape=dict(heads=hq, kv_heads=hkv, dqk=dqk, dv=dv, dtype=str(dtype), batch=1),
    layout=args.layout,
    results=results,
  )


def summary(report: dict) -> str:
  """Markdown table of the measured rows (and the ratio to cuDNN causal where measured)."""
  lines = [
    "| L | impl | mode | ms | useful TFLOP/s | dense-equiv TFLOP/s | vs cuDNN causal |",
    "|---|---|---|---|---|---|---|",
  ]
  cudnn = {
    (r["length"], r["mode"]): r["useful_tflops"]
    for r in report["results"]
    if r["impl"] == "cudnn_causal" and "useful_tflops" in r
  }
  for r in report["results"]:
    if "seconds" not in r:
      continue
    ref = cudnn.get((r["length"], r["mode"]))
    ratio = f"{r['useful_tflops'] / ref:.2f}" if ref and r["impl"] != "cudnn_causal" else ""
    lines.append(
      f"| {r['length']} | {r['impl']} | {r['mode']} | {r['seconds'] * 1e3:.2f} | "
      f"{r['useful_tflops']:.4f} | {r['dense_equiv_tflops']:.4f} | {ratio} |"
    )
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--tiny",
    action="store_true",
    help="CPU-sized run: L 512, 4 / 2 heads, widths 64 / 32, fp32, "
    "64-token blocks, small images (1-3 blocks)",
  )
  p.add_argument("--lengths", type=int, nargs="+", help="row lengths (default 4096 8192 16384)")
  p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
  p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
  p.add_argument(
    "--layout",
    choices=("neo", "neo_pref", "text"),
    default="neo",
    help="row layout (text: text-only samples, what impl cudnn takes)",
  )
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--dqk", type=int, default=256, help="query/key width (NEO: 128 + 64 + 64)")
  p.add_argument("--dv", type=int, default=128)
  p.add_argument("--scale", type=float, default=None, help="default 1/sqrt(dv), as NEO")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--block-q", type=int, default=None, help="kernel query block")
  p.add_argument("--block-kv", type=int, default=None, help="kernel key block")
  p.add_argument("--block-q-bwd", type=int, default=None, help="GPU kernel backward q block")
  p.add_argument("--block-kv-bwd", type=int, default=None, help="GPU kernel backward kv block")
  p.add_argument("--q-chunk", type=int, default=1024, help="xla_chunked query chunk")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="write the report as JSON here")
  args = p.parse_args(argv)
  if args.tiny:
    args.lengths = args.lengths or [512]
    args.heads, args.kv_heads, args.dqk, args.dv = 4, 2, 64, 32
    args.dtype = "float32"
    args.block_q = args.block_q or 64
    args.block_kv = args.block_kv or 64
    args.block_q_bwd = args.block_q_bwd or 64
    args.block_kv_bwd = args.block_kv_bwd or 64
    args.q_chunk = min(args.q_chunk, 128)
    args.iters, args.warmup = min(args.iters, 3), min(args.warmup, 1)
  args.lengths = args.lengths or [4096, 8192, 16384]
  report = run(args)
  print()
  print(
    f"{report['date']}  {report['device']} ({report['backend']})  jax {report['jax']}  "
    f"{report['host']}"
  )
  print(f"command: {report['command']}")
  print(summary(report))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
