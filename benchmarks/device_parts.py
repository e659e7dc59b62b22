"""The parts of `make device-check`; benchmarks/device_check.py runs each in its own process.

    python benchmarks/device_parts.py --part NAME --out RESULT.json [--budget-s S] [--smoke]
        [--layers N] [--peak-tflops X] [--kernel IMPL] [--check-rows neo_pref:8192,text:8192]
        [--xla-baseline 0|1] [--speed-lengths 8192,...] [--speed-text-lengths 8192,...]
        [--speed-impls pallas_gpu,...] [--train-seqs 8192,...] [--remats full,...]

A part rewrites its result file after every measurement, so a part stopped at its time budget
still leaves what it measured; it also checks its own clock and skips what no longer fits.
`--smoke` (automatic on CPU) runs tiny shapes, interpret-mode kernels and the tiny model: the
same code paths in seconds; there the options that choose lengths keep the tiny ones (one per
layout asked for), the ones that choose layouts, implementations and remat policies apply.
Only model, ops, config, parallel, the train step and synthetic batches, and inference are
imported: nothing of the data pipeline (grain, TFDS, tokenizers).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import types
import warnings
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from benchmarks import attention as attn_bench  # noqa: E402
from benchmarks import generate as gen_bench  # noqa: E402
from benchmarks import train_step as train_bench  # noqa: E402
from benchmarks.device_check import PART_OPTIONS  # noqa: E402
from neo_jax import config as neo_config  # noqa: E402
from neo_jax.ops import flash_common as fc  # noqa: E402
from neo_jax.ops import masks, pallas_gpu, pallas_tpu  # noqa: E402
from neo_jax.ops.attention import KernelFallbackWarning, attention, resolve  # noqa: E402
from neo_jax.ops.layouts import describe  # noqa: E402
from neo_jax.trainer.flops import peak_flops_per_device  # noqa: E402

KERNEL_TOL = 2e-2  # ||kernel - fp32 ref|| / ||ref|| accepted for bf16 inputs, out and grads
SEED = 0


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything whose size differs between a device run and the CPU smoke run."""

  heads: int = 16  # NEO-2B attention: 16 query / 8 kv heads, q/k width 256, v width 128
  kv_heads: int = 8
  dqk: int = 256
  dv: int = 128
  check_rows: tuple = (("neo", 8192), ("neo_pref", 8192), ("neo", 32768))
  check_baseline: bool = True  # kernel_check: also plain bf16 XLA against the reference
  speed_lengths: tuple = (8192, 16384, 32768)
  speed_impls: tuple = ()  # on NEO-like rows; () = kernel, cudnn_causal (GPU), xla_chunked, xla
  speed_text_lengths: tuple = ()  # text-only rows: the kernel against impl cudnn, fwd+bwd
  speed_reference_modes: tuple = ("fwd+bwd", "fwd")  # of xla and xla_chunked
  sweep_length: int = 8192
  sweep: tuple = ()  # block_sweep candidates (dicts) after the default; () = the part's own list
  q_chunk: int = 1024
  timed_iters: int = 10
  timed_max_s: float = 2.0
  matmul_n: int = 8192
  copy_bytes: int = 2**30
  model: str = "neo_2b"
  train_vocab: int = 0
  train_seqs: tuple = (8192, 16384)
  train_remats: tuple = ("full",)  # NeoConfig.remat_policy values, each a row per length
  train_image_tokens: tuple = (64, 1024)
  train_chunk: int = 1024
  train_steps: int = 3
  gen_batches: tuple = (1, 8)
  gen_image_tokens: int = 1296
  gen_text_tokens: int = 32
  gen_new_tokens: int = 64
  gen_repeat: int = 3
  compute_dtype: str = "bfloat16"
  tiny_rows: bool = False

  @property
  def scale(self) -> float:
    return self.dv**-0.5  # NEO: 1/sqrt(128)


FULL = Sizes()
SMOKE = Sizes(
  heads=4,
  kv_heads=2,
  dqk=64,
  dv=32,
  check_rows=(("neo", 256), ("neo_pref", 256)),
  speed_lengths=(256,),
  speed_reference_modes=("fwd+bwd",),
  sweep_length=256,
  q_chunk=64,
  timed_iters=2,
  timed_max_s=0.5,
  matmul_n=256,
  copy_bytes=2**22,
  model="tiny",
  train_vocab=512,
  train_seqs=(128,),
  train_image_tokens=(4, 16),
  train_chunk=64,
  train_steps=2,
  gen_batches=(2,),
  gen_image_tokens=16,
  gen_text_tokens=8,
  gen_new_tokens=4,
  gen_repeat=1,
  compute_dtype="float32",
  tiny_rows=True,
)

LAYOUTS = ("neo", "neo_pref", "text")  # kernel_check rows; text: checks impl cudnn


def _names(text: str) -> tuple:
  return tuple(x for x in text.split(",") if x)


def parse_sweep(text: str) -> tuple[dict[str, int], ...]:
  """'block_q=64,block_kv=64;num_warps=8' -> ({'block_q': 64, 'block_kv': 64},
  {'num_warps': 8}): block-size candidates, ';' between them, ',' between fields."""
  combos = []
  for candidate in filter(None, (c.strip() for c in text.split(";"))):
    combo = {}
    for item in _names(candidate):
      key, sep, value = item.partition("=")
      if not sep or not key.strip() or not value.strip().isdigit():
        raise SystemExit(f"--sweep: FIELD=INT[,FIELD=INT][;...], got {item!r} in {candidate!r}")
      combo[key.strip()] = int(value)
    if combo:
      combos.append(combo)
  return tuple(combos)


def configure(base: Sizes, args: argparse.Namespace, smoke: bool) -> Sizes:
  """`base` with the command line's choices. Layouts, remat policies and the baseline apply in
  both modes; lengths only on a device (smoke keeps its tiny length, one per layout)."""
  tiny = base.speed_lengths[0]
  over: dict[str, Any] = {}
  if getattr(args, "check_rows", None):
    rows = [row.split(":") for row in _names(args.check_rows)]
    for row in rows:
      if row[0] not in LAYOUTS or len(row) != 2:
        raise SystemExit(f"--check-rows: LAYOUT:LENGTH with LAYOUT in {LAYOUTS}, got {row}")
    over["check_rows"] = tuple((r[0], tiny if smoke else int(r[1])) for r in rows)
  if getattr(args, "xla_baseline", None) is not None:
    over["check_baseline"] = bool(int(args.xla_baseline))
  if getattr(args, "speed_lengths", None) and not smoke:
    over["speed_lengths"] = tuple(int(x) for x in _names(args.speed_lengths))
  if getattr(args, "speed_impls", None):
    over["speed_impls"] = _names(args.speed_impls)
  if getattr(args, "speed_text_lengths", None):
    given = tuple(int(x) for x in _names(args.speed_text_lengths))
    over["speed_text_lengths"] = (tiny,) if smoke else given
  if getattr(args, "train_seqs", None) and not smoke:
    over["train_seqs"] = tuple(int(x) for x in _names(args.train_seqs))
  if getattr(args, "remats", None):
    over["train_remats"] = _names(args.remats)
  if getattr(args, "sweep", None):
    over["sweep"] = parse_sweep(args.sweep)
  return dataclasses.replace(base, **over)


# pallas_gpu.BlockSizes candidates at L = 8k (fields absent from BlockSizes are ignored and
# reported; unset fields come from the kernel's table). The first is the default; each other
# changes the forward or the backward alone, so a row's difference to the default is that
# knob's. Shared memory (bytes, widths 256 / 128, bf16; pallas_gpu.smem_bytes) in comments.
GPU_SWEEP = (
  {},  # fwd 128x32 s2 114688; dq 32x64 s2 122880; dk/dv 98304 (the measured best of run 1)
  dict(num_stages=3),  # fwd 139264
  dict(num_warps=8),
  dict(block_kv=64, num_warps=8, num_stages=3),  # fwd 212992 (run 1's fastest forward)
  dict(num_warps_bwd=8),
  dict(num_stages_bwd=3),  # dq 172032, dk/dv 122880
  dict(block_q_bwd=64, block_kv_bwd=64, num_warps_bwd=8),  # dq and dk/dv 147456
  dict(block_q_bwd=32, block_kv_bwd=128, num_warps_bwd=8),  # dq 221184, dk/dv 147456
)
TPU_SWEEP = (
  {},
  dict(block_q=256, block_kv=256),
  dict(block_q=1024, block_kv=512),
  dict(block_q=512, block_kv=1024),
  dict(block_q=256, block_kv=512),
  dict(block_q=1024, block_kv=1024),
  dict(block_q=128, block_kv=128),
)
SMOKE_SWEEP = ({}, dict(block_q=64, block_kv=64, block_q_bwd=32, block_kv_bwd=32))


def first_lines(exc: BaseException, n: int = 3, width: int = 300) -> str:
  lines = [line for line in str(exc).splitlines() if line.strip()][:n]
  return f"{type(exc).__name__}: " + " | ".join(line[:width] for line in lines)


class Part:
  """One part's run: its clock, its budget and its result file."""

  def __init__(self, name: str, out: str, budget_s: float, args: argparse.Namespace):
    self.name, self.out, self.args = name, out, args
    self.t0 = time.perf_counter()
    self.deadline = self.t0 + 0.92 * budget_s - 1.0  # leave time to write and exit
    self.backend = jax.default_backend()
    self.smoke = bool(args.smoke) or self.backend == "cpu"
    self.sizes = configure(SMOKE if self.smoke else FULL, args, self.smoke)
    default_kernel = {"tpu": "pallas_tpu"}.get(self.backend, "pallas_gpu")
    self.kernel = args.kernel or default_kernel
    self.result: dict[str, Any] = {}
    self.compile_s = 0.0
    self.run_s = 0.0
    self._executables: dict = {}

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  def save(self, status: str = "running", error: str | None = None) -> None:
    doc = dict(
      part=self.name,
      status=status,
      smoke=self.smoke,
      backend=self.backend,
      wall_s=round(time.perf_counter() - self.t0, 2),
      compile_s=round(self.compile_s, 2),
      run_s=round(self.run_s, 2),
      result=self.result,
    )
    if error:
      doc["error"] = error
    tmp = self.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, self.out)

  def add(self, key: str, row: dict) -> None:
    self.result.setdefault(key, []).append(row)
    self.save()

  def time_call(self, fn, args_, iters: int | None = None, warmup: int = 2) -> attn_bench.Timing:
    max_s = min(self.sizes.timed_max_s, max(self.left() / 4, 0.05))
    t = attn_bench.time_call(fn, args_, iters or self.sizes.timed_iters, warmup, max_s=max_s)
    self.compile_s += t.compile_s
    self.run_s += t.first_s + (t.iters + warmup) * t.median_s
    return t

  def compiled(self, fn, *args_):
    """(outputs, compile seconds, run seconds) of one call of jit(fn); calls of the same fn on
    arrays of the same shapes (rows of one length) reuse the compiled program."""
    key = (
      fn,
      str(jax.tree.structure(args_)),
      tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args_)),
    )
    t0 = time.perf_counter()
    if key not in self._executables:
      self._executables[key] = jax.jit(fn).lower(*args_).compile()
    exe = self._executables[key]
    t1 = time.perf_counter()
    out = jax.block_until_ready(exe(*args_))
    t2 = time.perf_counter()
    self.compile_s += t1 - t0
    self.run_s += t2 - t1
    return out, t1 - t0, t2 - t1


def device_memory_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def dense_fits(length: int, heads: int, mode: str) -> bool:
  """Whether the dense reference's fp32 [H, L, L] scores (and their gradient) fit in memory."""
  limit = device_memory_bytes()
  if limit is None:
    return True
  copies = 3 if mode == "fwd" else 6
  return copies * 4.0 * heads * length * length < 0.8 * limit


# --- env ----------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
  names = {}
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name.startswith(
      (
        "jax",
        "flax",
        "optax",
        "orbax",
        "triton",
        "nvidia-cudnn",
        "nvidia-cublas",
        "nvidia-cuda-runtime",
        "libtpu",
      )
    ):
      names[name] = dist.version
  return dict(sorted(names.items()))


def cuda_versions() -> dict[str, Any]:
  out: dict[str, Any] = {}
  try:
    from jax._src.lib import cuda_versions as cv  # present in CUDA jaxlib plugins only
  except ImportError:
    return out
  if cv is None:
    return out
  for name in (
    "cuda_runtime_get_version",
    "cuda_driver_get_version",
    "cudnn_get_version",
    "cublas_get_version",
    "cuda_compute_capability",
  ):
    fn = getattr(cv, name, None)
    if fn is None:
      continue
    try:
      out[name.replace("_get_version", "")] = fn(0) if "capability" in name else fn()
    except Exception as e:  # noqa: BLE001 - informative only
      out[name] = first_lines(e, 1)
  return out


def nvidia_smi() -> str | None:
  try:
    r = subprocess.run(
      [
        "nvidia-smi",
        "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
        "--format=csv,noheader",
      ],
      capture_output=True,
      text=True,
      timeout=15,
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return r.stdout.strip() or None


def throughput_s(exe, args_, per_sample: int, samples: int, warmup: int = 3) -> list[float]:
  """Seconds per call: `per_sample` back-to-back calls per sample, then one sync."""
  for _ in range(warmup):
    jax.block_until_ready(exe(*args_))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(per_sample):
      out = exe(*args_)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / per_sample)
  return times


def part_env(p: Part) -> None:
  dev = jax.devices()[0]
  vendor = peak_flops_per_device(dev.device_kind)
  p.result.update(
    backend=p.backend,
    device_kind=dev.device_kind,
    device_count=jax.device_count(),
    platform_version=getattr(dev.client, "platform_version", None),
    device_memory_gb=round((device_memory_bytes() or 0) / 2**30, 2),
    vendor_peak_tflops=vendor / 1e12 if vendor else None,
    jax=jax.__version__,
    versions=package_versions(),
    python=platform.python_version(),
    host=f"{platform.machine()}, {os.cpu_count()} cpus",
    smoke=p.smoke,
    kernel=p.kernel,
    **cuda_versions(),
  )
  if p.backend == "gpu":
    p.result["nvidia_smi"] = nvidia_smi()
  p.save()

  n = p.sizes.matmul_n
  ka, kb = jax.random.split(jax.random.key(SEED))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(jnp.bfloat16)
  t0 = time.perf_counter()
  exe = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
  p.compile_s += time.perf_counter() - t0
  t0 = time.perf_counter()
  times = throughput_s(exe, (a, b), per_sample=10, samples=15)
  p.run_s += time.perf_counter() - t0
  flop = 2.0 * n**3
  p.result["bf16_matmul"] = dict(
    n=n,
    samples=len(times),
    calls_per_sample=10,
    median_ms=statistics.median(times) * 1e3,
    median_tflops=flop / statistics.median(times) / 1e12,
    best_tflops=flop / min(times) / 1e12,
  )
  p.save()

  x = jax.random.normal(ka, (p.sizes.copy_bytes // 4,), jnp.float32)
  t0 = time.perf_counter()
  exe = jax.jit(lambda x: x + 1.0).lower(x).compile()
  p.compile_s += time.perf_counter() - t0
  t0 = time.perf_counter()
  times = throughput_s(exe, (x,), per_sample=10, samples=10)
  p.run_s += time.perf_counter() - t0
  moved = 2.0 * x.size * 4  # read + write
  p.result["copy"] = dict(
    bytes=x.size * 4,
    what="y = x + 1 (fp32): bytes read + written per second",
    median_gb_s=moved / statistics.median(times) / 1e9,
    best_gb_s=moved / min(times) / 1e9,
  )


# --- kernel_check ------------------------------------------------------------------------------


def _padding(ids) -> jax.Array:
  return ids.segment_ids[0] == 0  # [L]


@jax.jit
def _compare(got, want, pad_l):
  """Per output: relative L2 error, max abs error, finiteness, padding rows exactly zero."""
  out = {}
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    g32, w32 = g.astype(jnp.float32), w.astype(jnp.float32)
    diff = g32 - w32
    out[name] = dict(
      rel_l2=jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(w32), 1e-30),
      max_abs=jnp.max(jnp.abs(diff)),
      ref_max_abs=jnp.max(jnp.abs(w32)),
      finite=jnp.all(jnp.isfinite(g32)),
      padding_zero=jnp.all(jnp.where(pad_l[None, :, None, None], g32 == 0, True)),
    )
  return out


def _flat(out_grads) -> tuple:
  out, (dq, dk, dv) = out_grads
  return out, dq, dk, dv


def _summary(metrics: dict) -> dict:
  return {
    name: {k: (bool(v) if v.dtype == bool else float(v)) for k, v in m.items()}
    for name, m in metrics.items()
  }


def part_kernel_check(p: Part) -> None:
  s = p.sizes
  checked = {
    impl: attn_bench.for_mode(
      lambda q, k, v, ids, impl=impl: attention(q, k, v, ids, impl=impl, scale=s.scale), "fwd+bwd"
    )
    for impl in (p.kernel, "cudnn")
  }
  fwd_bwd = {
    impl: attn_bench.for_mode(attn_bench.attention_fn(impl, s.scale, q_chunk=s.q_chunk), "fwd+bwd")
    for impl in ("xla", "xla_chunked")
  }
  p.result.update(
    kernel=p.kernel,
    tolerance_rel_l2=KERNEL_TOL,
    shape=dict(
      heads=s.heads, kv_heads=s.kv_heads, dqk=s.dqk, dv=s.dv, dtype="bfloat16", scale=s.scale
    ),
  )
  for layout, length in s.check_rows:
    impl = "cudnn" if layout == "text" else p.kernel  # text-only rows: what cudnn takes
    row: dict[str, Any] = dict(layout=layout, length=length, impl=impl)
    why = attn_bench.runnable(impl, p.backend, tiny=True)
    if why:
      p.add("rows", dict(row, skipped=why))
      continue
    if p.left() < 10 and not p.smoke:
      p.add("rows", dict(row, skipped="part budget spent"))
      continue
    samples, ids = attn_bench.build_row(
      length, SEED, tiny=s.tiny_rows, preference=layout == "neo_pref", text=layout == "text"
    )
    allowed = int(masks.num_allowed(masks.kv_ranges(ids)).sum())
    pad_l = _padding(ids)
    q, k, v, g = attn_bench.make_inputs(
      length, s.heads, s.kv_heads, s.dqk, s.dv, jnp.bfloat16, SEED
    )
    row.update(
      row_text=describe(samples)[:160],
      allowed_fraction=allowed / length**2,
      padding_tokens=int(pad_l.sum()),
    )
    ref_impl = "xla" if dense_fits(length, s.heads, "fwd+bwd") else "xla_chunked"
    ref_fn = fwd_bwd[ref_impl]
    row["reference"] = f"{ref_impl}, fp32 inputs (cast from the same bf16), highest precision"
    try:
      with jax.default_matmul_precision("highest"):
        f32 = lambda x: x.astype(jnp.float32)
        want, c, r = p.compiled(ref_fn, f32(q), f32(k), f32(v), ids, f32(g))
      want = _flat(want)
      row["reference_s"] = dict(compile=round(c, 2), run=round(r, 3))
    except Exception as e:  # noqa: BLE001 - recorded
      p.add("rows", dict(row, error=f"reference: {first_lines(e)}"))
      continue
    try:
      got, c, r = p.compiled(checked[impl], q, k, v, ids, g)
      row["kernel_s"] = dict(compile=round(c, 2), run=round(r, 3))
      metrics = _summary(_compare(_flat(got), want, pad_l))
      del got
      row["kernel"] = metrics
      row["pass"] = all(
        m["finite"] and m["padding_zero"] and m["rel_l2"] < KERNEL_TOL for m in metrics.values()
      )
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a result
      row["kernel_error"] = first_lines(e)
      row["pass"] = False
    p.add("rows", row)
    if not s.check_baseline or (p.left() < 20 and not p.smoke):
      continue
    # what plain bf16 XLA attention gets against the same reference: the yardstick for the
    # kernel's error
    try:
      base, _, _ = p.compiled(ref_fn, q, k, v, ids, g)
      row["xla_bf16"] = _summary(_compare(_flat(base), want, pad_l))
    except Exception as e:  # noqa: BLE001 - recorded
      row["xla_bf16_error"] = first_lines(e)
    p.save()


# --- kernel_speed ------------------------------------------------------------------------------


def part_kernel_speed(p: Part) -> None:
  s = p.sizes
  default = [p.kernel] + (["cudnn_causal"] if p.backend == "gpu" else []) + ["xla_chunked", "xla"]
  usable = lambda names: [i for i in names if not attn_bench.runnable(i, p.backend, tiny=True)]
  impls = usable(s.speed_impls or default)
  rows = [("neo", length, impls) for length in s.speed_lengths] + [
    ("text", length, usable([p.kernel, "cudnn"])) for length in s.speed_text_lengths
  ]
  p.result.update(
    kernel=p.kernel,
    impls=impls,
    shape=dict(
      heads=s.heads, kv_heads=s.kv_heads, dqk=s.dqk, dv=s.dv, dtype="bfloat16", scale=s.scale
    ),
  )
  for layout, length, row_impls in rows:
    samples, ids = attn_bench.build_row(length, SEED, tiny=s.tiny_rows, text=layout == "text")
    allowed = int(masks.num_allowed(masks.kv_ranges(ids)).sum())
    q, k, v, g = attn_bench.make_inputs(
      length, s.heads, s.kv_heads, s.dqk, s.dv, jnp.bfloat16, SEED
    )
    for impl in row_impls:
      if impl.startswith("xla"):
        modes = s.speed_reference_modes
      else:  # text rows compare the kernel with cuDNN on the training path only
        modes = ("fwd+bwd",) if layout == "text" else ("fwd+bwd", "fwd")
      for mode in modes:
        row = dict(
          layout=layout, length=length, impl=impl, mode=mode, allowed_fraction=allowed / length**2
        )
        if impl == "xla" and not dense_fits(length, s.heads, mode):
          p.add("rows", dict(row, skipped="dense [H, L, L] scores do not fit in memory"))
          continue
        if p.left() < 8 and not p.smoke:
          p.add("rows", dict(row, skipped="part budget spent"))
          continue
        fn = attn_bench.for_mode(attn_bench.attention_fn(impl, s.scale, q_chunk=s.q_chunk), mode)
        args_ = (q, k, v, ids) if mode == "fwd" else (q, k, v, ids, g)
        try:
          t = p.time_call(fn, args_)
        except Exception as e:  # noqa: BLE001 - out of memory, unsupported: recorded
          p.add("rows", dict(row, error=first_lines(e)))
          continue
        useful, dense = attn_bench.impl_flops(impl, allowed, length, s.heads, s.dqk, s.dv, mode)
        p.add(
          "rows",
          dict(
            row,
            ms=t.median_s * 1e3,
            iters=t.iters,
            compile_s=round(t.compile_s, 2),
            useful_tflops=useful / t.median_s / 1e12,
            dense_equiv_tflops=dense / t.median_s / 1e12,
          ),
        )


# --- block_sweep -------------------------------------------------------------------------------


def block_sizes(cls, combo: dict):
  """(cls instance with the known fields of combo, ignored field names)."""
  fields = {f.name for f in dataclasses.fields(cls)}
  known = {k: v for k, v in combo.items() if k in fields}
  return dataclasses.replace(cls(), **known), sorted(set(combo) - fields)


def part_block_sweep(p: Part) -> None:
  s = p.sizes
  if p.kernel == "pallas_gpu":
    cls, combos = pallas_gpu.BlockSizes, (SMOKE_SWEEP if p.smoke else GPU_SWEEP)
    make = lambda b: attn_bench.attention_fn("pallas_gpu", s.scale, gpu_blocks=b)
    widths = (fc.next_pow2(s.dqk), fc.next_pow2(s.dv))  # what the kernel pads to
    # the settings the kernel will use on this device (unset fields from its table)
    complete = lambda b: pallas_gpu.block_sizes_for(*widths, jnp.bfloat16, b)
    p.result["smem_limit"] = pallas_gpu.device_smem_bytes()
  else:
    cls, combos = pallas_tpu.BlockSizes, (SMOKE_SWEEP if p.smoke else TPU_SWEEP)
    make = lambda b: attn_bench.attention_fn("pallas_tpu", s.scale, tpu_blocks=b)
    complete = lambda b: b
  if s.sweep:  # the command line's candidates, after the default
    combos = ({},) + s.sweep
  length = s.sweep_length
  samples, ids = attn_bench.build_row(length, SEED, tiny=s.tiny_rows)
  allowed = int(masks.num_allowed(masks.kv_ranges(ids)).sum())
  q, k, v, g = attn_bench.make_inputs(length, s.heads, s.kv_heads, s.dqk, s.dv, jnp.bfloat16, SEED)
  useful, _ = attn_bench.impl_flops(p.kernel, allowed, length, s.heads, s.dqk, s.dv, "fwd+bwd")
  p.result.update(kernel=p.kernel, length=length, mode="fwd+bwd", default=repr(complete(cls())))
  for combo in combos:
    sizes, ignored = block_sizes(cls, combo)
    shown = complete(sizes)
    row = dict(block_sizes=repr(shown), fields=dataclasses.asdict(shown), default=not combo)
    if p.kernel == "pallas_gpu":
      row["smem_bytes"] = pallas_gpu.smem_bytes(shown, *widths)
    if ignored:
      row["ignored_fields"] = ignored
    if p.left() < 8 and not p.smoke:
      p.add("rows", dict(row, skipped="part budget spent"))
      continue
    try:
      t = p.time_call(
        attn_bench.for_mode(make(sizes), "fwd+bwd"),
        (q, k, v, ids, g),
        iters=5 if not p.smoke else 2,
        warmup=1,
      )
    except Exception as e:  # noqa: BLE001 - a combination that does not compile is a result
      p.add("rows", dict(row, error=first_lines(e, 1)))
      continue
    p.add(
      "rows",
      dict(
        row,
        ms=t.median_s * 1e3,
        compile_s=round(t.compile_s, 2),
        useful_tflops=useful / t.median_s / 1e12,
      ),
    )
  done = [r for r in p.result.get("rows", []) if "ms" in r]
  if done:
    best = min(done, key=lambda r: r["ms"])
    default = next((r for r in done if r["default"]), None)
    p.result["best"] = dict(
      block_sizes=best["block_sizes"],
      ms=best["ms"],
      speedup_vs_default=(default["ms"] / best["ms"]) if default else None,
    )


# --- train_step --------------------------------------------------------------------------------


def _state_deleted(bench) -> bool:
  return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(bench.state))


def part_train_step(p: Part) -> None:
  s = p.sizes
  layers = p.args.layers
  kind = jax.devices()[0].device_kind
  peaks = {}
  if p.args.peak_tflops:
    peaks["measured bf16 matmul"] = p.args.peak_tflops * 1e12
  if peak_flops_per_device(kind):
    peaks["vendor"] = peak_flops_per_device(kind)
  attention_impl = "auto"
  cfg = train_bench.model_config(
    s.model,
    layers=layers,
    vocab=s.train_vocab,
    dtype=s.compute_dtype,
    remat=s.train_remats[0],
    attention=attention_impl,
  )
  p.result.update(
    model=s.model,
    layers=cfg.num_hidden_layers,
    prebuffer_layers=cfg.num_prebuffer_layers,
    hidden=cfg.hidden_size,
    vocab=cfg.vocab_size,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    remats=list(s.train_remats),
    attention=resolve(attention_impl),
    stage="sft",
    peaks_tflops={k: v / 1e12 for k, v in peaks.items()},
  )
  limit = device_memory_bytes()
  t0 = time.perf_counter()
  bench = train_bench.prepare(cfg, "sft")
  jax.block_until_ready(bench.state)
  p.result["init_s"] = round(time.perf_counter() - t0, 2)
  p.compile_s += time.perf_counter() - t0
  p.save()
  fallback = None  # auto's KernelFallbackWarning: it warns once, the choice holds for the run
  for seq in s.train_seqs:
    for remat in s.train_remats:  # in order of the memory they keep: each needs a compile
      if p.left() < (15 if not p.result.get("rows") else 25) and not p.smoke:
        p.add("rows", dict(seq_len=seq, remat=remat, skipped="part budget spent"))
        continue
      bench.cfg = bench.cfg.replace(remat_policy=remat)
      if _state_deleted(bench):  # donated to a step that failed
        bench = train_bench.prepare(bench.cfg, "sft")
      # synthetic samples are an image and ~10 text tokens: a visual budget of L fills the row
      kw = dict(
        batch=1,
        seq_len=seq,
        visual=seq,
        image_tokens=s.train_image_tokens,
        k=0,
        chunk=s.train_chunk,
        steps=s.train_steps,
        peaks=peaks,
        max_bytes=None if limit is None else 0.97 * limit,
      )
      try:
        with warnings.catch_warnings(record=True) as caught:
          warnings.simplefilter("always", KernelFallbackWarning)
          r = train_bench.measure(bench, **kw)
        fallback = next(
          (str(w.message) for w in caught if issubclass(w.category, KernelFallbackWarning)),
          fallback,
        )
      except Exception as e:  # noqa: BLE001 - e.g. the kernel fails at run time: the reference
        p.add(
          "rows",
          dict(
            seq_len=seq,
            remat=remat,
            attention=resolve(bench.cfg.attention_impl),
            error=first_lines(e),
          ),
        )
        out_of_memory = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
        if out_of_memory or resolve(bench.cfg.attention_impl) == "xla_chunked" or p.left() < 30:
          continue
        bench.cfg = bench.cfg.replace(attention_impl="xla_chunked")
        if _state_deleted(bench):
          bench = train_bench.prepare(bench.cfg, "sft")
        try:
          r = train_bench.measure(bench, **kw)
        except Exception as e2:  # noqa: BLE001 - recorded
          p.add(
            "rows", dict(seq_len=seq, remat=remat, attention="xla_chunked", error=first_lines(e2))
          )
          continue
      r["attention"] = "xla_chunked" if fallback else resolve(r["attention"])
      if fallback:
        r["attention_fallback"] = fallback[:300]
      p.compile_s += r["compile_s"]
      if "step_s" in r:
        p.run_s += r["first_step_s"] - r["compile_s"] + r["steps"] * r["step_s"]
      p.add("rows", r)


# --- generate ----------------------------------------------------------------------------------


def part_generate(p: Part) -> None:
  s = p.sizes
  dtype = s.compute_dtype
  cfg = neo_config.preset(
    s.model,
    dtype=dtype,
    param_dtype=dtype,
    attention_impl="auto",
    **train_bench.depth_overrides(p.args.layers),
  )
  p.result.update(
    model=s.model,
    layers=cfg.num_hidden_layers,
    dtype=dtype,
    attention=resolve("auto"),
    image_tokens=s.gen_image_tokens,
    text_tokens=s.gen_text_tokens,
    new_tokens=s.gen_new_tokens,
  )
  t0 = time.perf_counter()
  params = jax.block_until_ready(gen_bench.random_params(cfg))
  p.result["init_s"] = round(time.perf_counter() - t0, 2)
  p.save()
  for batch in s.gen_batches:
    if p.left() < 10 and not p.smoke:
      p.add("rows", dict(batch=batch, skipped="part budget spent"))
      continue
    try:
      r = gen_bench.bench(
        params,
        cfg,
        batch,
        text_tokens=s.gen_text_tokens,
        images=1,
        image_tokens=s.gen_image_tokens,
        new_tokens=s.gen_new_tokens,
        repeat=s.gen_repeat,
      )
    except Exception as e:  # noqa: BLE001 - recorded
      p.add("rows", dict(batch=batch, error=first_lines(e)))
      continue
    p.compile_s += r["compile_prefill_s"] + r["compile_decode_s"]
    p.run_s += s.gen_repeat * (r["prefill_s"] + r["decode_s"])
    p.add("rows", r)


# --- mosaic_probe ------------------------------------------------------------------------------


def mosaic_pallas_call() -> tuple[str, Callable]:
  """(how, pallas_call-like function) running a pallas_call kernel on Mosaic GPU: jax 0.10
  selects the backend by compiler params; from 0.11 on, pallas_call-style kernels reach it
  through a shim over `plgpu.kernel` and its pipeline."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  params = plgpu.CompilerParams()
  try:
    from jax._src.pallas.mosaic_gpu import pallas_call as shim  # jax >= 0.11
  except ImportError:
    shim = None
  if shim is None or not hasattr(shim, "pallas_call"):
    return (
      "pl.pallas_call(compiler_params=plgpu.CompilerParams())",
      lambda *a, **kw: pl.pallas_call(*a, **dict(kw, compiler_params=params)),
    )
  keep = ("grid", "in_specs", "out_specs", "scratch_shapes")
  return (
    "jax._src.pallas.mosaic_gpu.pallas_call.pallas_call (plgpu.kernel + pipeline)",
    lambda kernel, out_shape, **kw: shim.pallas_call(
      kernel, out_shape, compiler_params=params, **{k: v for k, v in kw.items() if k in keep}
    ),
  )


class _MosaicPallas(types.ModuleType):
  """Stands in for `pallas` inside the GPU kernel's module: every pallas_call goes to Mosaic
  GPU instead of Triton; everything else is Pallas itself."""

  def __init__(self, call: Callable):
    super().__init__("pallas_mosaic_probe")
    self._call = call

  def __getattr__(self, name):
    return getattr(pl, name)

  def pallas_call(self, *args, **kwargs):
    return self._call(*args, **kwargs)


def _probe(name: str, fn: Callable, args_: tuple, compile_too: bool) -> dict:
  """Stages reached: lowered for CUDA, compiled, ran (with the first error's lines)."""
  row: dict[str, Any] = dict(probe=name, lowered=False)
  try:
    t0 = time.perf_counter()
    jitted = jax.jit(fn)
    if compile_too:
      lowered = jitted.lower(*args_)
    else:
      lowered = jitted.trace(*args_).lower(lowering_platforms=("cuda",))
    row.update(lowered=True, lower_s=round(time.perf_counter() - t0, 2))
    if compile_too:
      row["compiled"] = False
      exe = lowered.compile()
      row.update(compiled=True, compile_s=round(time.perf_counter() - t0, 2))
      out = jax.block_until_ready(exe(*args_))
      row.update(ran=True, out=out)
  except Exception as e:  # noqa: BLE001 - the probe's answer
    row["error"] = first_lines(e, 4)
    frame = traceback.extract_tb(e.__traceback__)[-1]
    row["where"] = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
  return row


def part_mosaic_probe(p: Part) -> str | None:
  if p.backend not in ("gpu", "cpu"):
    p.result["reason"] = "not a GPU"
    return "skipped"
  on_gpu = p.backend == "gpu"
  route, call = mosaic_pallas_call()
  p.result.update(
    mode=("compile and run on this GPU" if on_gpu else "lowering for CUDA only (no GPU here)"),
    route=route,
  )

  def add_one(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  x = jnp.arange(2 * 128, dtype=jnp.float32).reshape(2, 128)
  trivial = call(add_one, jax.ShapeDtypeStruct(x.shape, x.dtype))
  row = _probe("trivial elementwise kernel", trivial, (x,), on_gpu)
  if "out" in row:
    row["correct"] = bool(jnp.all(row.pop("out") == x + 1.0))
  p.add("rows", row)

  s = FULL  # NEO widths: the probe is about the real kernel body
  saved = pallas_gpu.pl
  pallas_gpu.pl = _MosaicPallas(call)
  try:
    for length in (128, 256):
      if p.left() < 5 and not p.smoke:
        break
      _, ids = attn_bench.build_row(length, SEED, tiny=True)
      q, k, v, g = attn_bench.make_inputs(length, 2, 1, s.dqk, s.dv, jnp.bfloat16, SEED)
      fwd = lambda q, k, v, ids: pallas_gpu.flash_attention(
        q, k, v, ids, scale=s.scale, interpret=False
      )
      row = _probe(
        f"NEO forward kernel, L={length}, 2/1 heads, widths 256/128", fwd, (q, k, v, ids), on_gpu
      )
      if "out" in row:
        pallas_gpu.pl = saved
        want = pallas_gpu.flash_attention(q, k, v, ids, scale=s.scale, interpret=False)
        diff = jnp.abs(row.pop("out").astype(jnp.float32) - want.astype(jnp.float32))
        row["max_abs_diff_vs_triton"] = float(diff.max())
        pallas_gpu.pl = _MosaicPallas(call)
      p.add("rows", row)
  finally:
    pallas_gpu.pl = saved
  return None


# --- test hook ---------------------------------------------------------------------------------


def part_sleep(p: Part) -> None:
  """Hangs (with a child process of its own): how the orchestrator's time limit is tested."""
  child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  p.result["child_pid"] = child.pid
  p.save()
  time.sleep(600)


PARTS: dict[str, Callable[[Part], str | None]] = {
  "env": part_env,
  "kernel_check": part_kernel_check,
  "kernel_speed": part_kernel_speed,
  "train_step": part_train_step,
  "generate": part_generate,
  "mosaic_probe": part_mosaic_probe,
  "block_sweep": part_block_sweep,
  "sleep": part_sleep,
}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--part", required=True, choices=sorted(PARTS))
  ap.add_argument("--out", required=True, help="result JSON (rewritten as the part goes)")
  ap.add_argument("--budget-s", type=float, default=60.0)
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (automatic on CPU)")
  ap.add_argument(
    "--layers",
    type=int,
    default=0,
    help="model depth for train_step and generate (0: the preset's)",
  )
  ap.add_argument(
    "--peak-tflops",
    type=float,
    default=0.0,
    help="measured bf16 matmul TFLOP/s (from env) for train_step's MFU",
  )
  ap.add_argument(
    "--kernel",
    choices=("pallas_gpu", "pallas_tpu"),
    default=None,
    help="kernel to check (default: the backend's; pallas_gpu on CPU)",
  )
  for name, text in PART_OPTIONS.items():
    ap.add_argument(f"--{name}", default=None, help=text)
  args = ap.parse_args(argv)
  part = Part(args.part, args.out, args.budget_s, args)
  part.save()
  try:
    status = PARTS[args.part](part) or "ok"
  except BaseException as e:  # noqa: BLE001 - reported to the orchestrator, then re-raised
    part.save("error", error="".join(traceback.format_exception(e))[-3000:])
    if isinstance(e, Exception):
      return 1
    raise
  part.save(status)
  return 0


if __name__ == "__main__":
  sys.exit(main())
