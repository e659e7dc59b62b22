"""`make device-check`: one command that measures a GPU or TPU host in at most 8 minutes.

    python3 benchmarks/device_check.py [--budget-s 480] [--out-dir DIR] [--layers N]
        [--parts env,kernel_check,...] [--part-budget NAME=SECONDS] [--smoke]

Each part (benchmarks/device_parts.py) runs in its own process under its own time limit, a
share of `--budget-s`; a part that finishes early leaves its time to the next ones, a part
that overruns is stopped (its whole process group) and reported as "timeout" with what it had
measured so far. Nothing here imports jax, so this process never holds the device. Writes
benchmarks/results/<date>-<device>.json (everything) and .md (the tables), copies both to
each `--out-dir`, and prints the tables last. On CPU (or with --smoke) the parts run tiny
shapes and interpret-mode kernels in seconds: the same code paths, no meaningful numbers.
Before any part starts it checks that the parts' libraries import (REQUIRED_MODULES) and, if
one does not, exits with status 2 naming it and how to carry its wheel.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARTS_SCRIPT = os.path.join(HERE, "device_parts.py")

# name -> seconds of the default 480 s budget (scaled with --budget-s), in running order
PARTS = {
  "env": 25,  # versions, bf16 matmul and memory-copy ceilings
  "kernel_check": 75,  # compiled kernel vs an fp32 reference, fwd and grads, 8k and 32k
  "kernel_speed": 110,  # TFLOP/s: kernel, cuDNN causal, XLA dense and chunked, 8k-32k
  "train_step": 125,  # neo_2b step: tokens/s, MFU, peak memory at 8k and 16k
  "generate": 60,  # prefill and decode tokens/s, batch 1 and 8
  "mosaic_probe": 25,  # does the kernel body lower and compile with Mosaic GPU
  "block_sweep": 45,  # GPU/TPU kernel block sizes at 8k, fwd+bwd (takes any time left)
}
# Options passed on to every part (each part reads the ones it needs; device_parts.configure).
PART_OPTIONS = {
  "check-rows": "kernel_check rows as LAYOUT:LENGTH,... (layouts neo, neo_pref, text)",
  "xla-baseline": "kernel_check: 0 skips plain bf16 XLA against the reference",
  "speed-lengths": "kernel_speed: NEO-like row lengths, e.g. 8192,16384",
  "speed-impls": "kernel_speed: implementations on NEO-like rows, e.g. pallas_gpu,cudnn_causal",
  "speed-text-lengths": "kernel_speed: text-only row lengths (the kernel and impl cudnn)",
  "train-seqs": "train_step: sequence lengths, e.g. 8192",
  "remats": "train_step: remat policies, e.g. full,dots_no_batch (each a row per length)",
  "sweep": "block_sweep: candidates after the default, FIELD=INT,...;... (the kernel's "
  "BlockSizes fields), e.g. 'block_q=64,block_kv=64;num_warps=8'",
}

# What the parts import beyond the standard library, checked before any part starts: a missing
# one would crash every part. A GPU image usually has all but ml_collections (pure Python).
REQUIRED_MODULES = ("numpy", "jax", "flax", "optax", "orbax.checkpoint", "ml_collections")
CARRY_HINT = (
  "on a machine with network: pip download --no-deps ml-collections (or the missing package); "
  "on the device host: pip install --no-deps --target DIR the wheel, then PYTHONPATH=DIR"
)

DEFAULT_BUDGET_S = 480.0
RESERVE_S = 15.0  # for stopping a part that overruns and writing the reports
MIN_START_S = 5.0  # a part with less time than this left is not started
KILL_GRACE_S = 3.0
LOG_TAIL_LINES = 25


def slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def shares(names: list[str], budget_s: float, fixed: dict[str, float]) -> dict[str, float]:
  """Seconds per part: `fixed` ones as given, the others scaled from PARTS to what is left."""
  spare = max(budget_s - RESERVE_S - sum(fixed.get(n, 0.0) for n in names), 0.0)
  weights = {n: PARTS.get(n, 10) for n in names if n not in fixed}
  total = sum(weights.values()) or 1.0
  return {n: fixed[n] if n in fixed else spare * weights[n] / total for n in names}


def tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def stop_group(proc: subprocess.Popen) -> None:
  """SIGTERM to the part's process group, SIGKILL after a grace period."""
  for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=wait_s)
      if sig == signal.SIGKILL:
        return
    except subprocess.TimeoutExpired:
      continue
  # the leader is gone; make sure nothing of its group outlives it
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run_part(name: str, timeout_s: float, work: str, extra: list[str], env: dict[str, str]) -> dict:
  """Runs one part in its own process group; returns its record for the report."""
  out = os.path.join(work, f"{name}.json")
  log = os.path.join(work, f"{name}.log")
  cmd = [
    sys.executable,
    PARTS_SCRIPT,
    "--part",
    name,
    "--out",
    out,
    "--budget-s",
    f"{timeout_s:.1f}",
  ] + extra
  t0 = time.perf_counter()
  with open(log, "w") as log_f:
    proc = subprocess.Popen(
      cmd,
      stdout=log_f,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      cwd=ROOT,
      env=env,
      start_new_session=True,
    )
    timed_out = False
    try:
      proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      timed_out = True
    finally:
      if proc.returncode is None or timed_out:
        stop_group(proc)
      else:  # a finished part may have left children behind
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
  wall = time.perf_counter() - t0
  record: dict[str, Any] = {"budget_s": round(timeout_s, 1), "wall_s": round(wall, 1)}
  try:
    with open(out) as f:
      written = json.load(f)
  except (OSError, ValueError):
    written = {}
  record.update(
    {k: written[k] for k in ("compile_s", "run_s", "smoke", "backend", "error") if k in written}
  )
  record["result"] = written.get("result", {})
  if timed_out:
    record["status"] = "timeout"
  elif proc.returncode != 0:
    record["status"] = "error" if written.get("status") == "error" else "crashed"
    record["exit_code"] = proc.returncode
  else:
    record["status"] = written.get("status", "crashed")
  if record["status"] != "ok":
    record["log_tail"] = tail(log)
  return record


def part_env(cache_dir: str | None) -> dict[str, str]:
  env = dict(os.environ)
  if cache_dir:  # programs that several parts compile (the kernel at 8k) compile once
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["PYTHONPATH"] = os.pathsep.join(
    [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


# --- report ------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 1) -> str:
  if x is None:
    return ""
  if isinstance(x, bool):
    return "yes" if x else "NO"
  if isinstance(x, (int, float)):
    return f"{x:,.{digits}f}"
  return str(x)


def _e(x: float | None) -> str:
  return "" if x is None else f"{x:.1e}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
    "| " + " | ".join(r) + " |" for r in rows
  ]


def _not_measured(r: dict) -> str:
  return r.get("skipped") and f"skipped: {r['skipped']}" or r.get("error", "")


def md_env(res: dict) -> list[str]:
  lines = [
    f"- device: {res.get('device_kind')} x {res.get('device_count')} "
    f"({res.get('backend')}, {res.get('device_memory_gb')} GiB usable by jax), "
    f"host {res.get('host')}, Python {res.get('python')}"
  ]
  versions = ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items())
  lines.append(f"- versions: {versions}; platform {res.get('platform_version')}")
  cuda = {
    k: res[k]
    for k in ("cuda_runtime", "cuda_driver", "cudnn", "cublas", "cuda_compute_capability")
    if k in res
  }
  if cuda:
    lines.append("- CUDA: " + ", ".join(f"{k} {v}" for k, v in cuda.items()))
  if res.get("nvidia_smi"):
    lines.append(f"- nvidia-smi: {res['nvidia_smi']}")
  mm, cp = res.get("bf16_matmul"), res.get("copy")
  if mm:
    vendor = res.get("vendor_peak_tflops")
    of = f" ({mm['median_tflops'] / vendor:.0%} of the vendor's {vendor:.0f})" if vendor else ""
    lines.append(
      f"- bf16 matmul {mm['n']}^3: median {mm['median_tflops']:.1f} TFLOP/s{of}, "
      f"best {mm['best_tflops']:.1f} ({mm['samples']} samples of "
      f"{mm['calls_per_sample']} calls)"
    )
  if cp:
    lines.append(
      f"- memory, {cp['what']}: median {cp['median_gb_s']:.0f} GB/s, best "
      f"{cp['best_gb_s']:.0f} GB/s over {cp['bytes'] / 2**30:.2f} GiB"
    )
  return lines


def md_kernel_check(res: dict) -> list[str]:
  rows = []
  for r in res.get("rows", []):
    m = r.get("kernel")
    base = r.get("xla_bf16", {})
    impl = r.get("impl", res.get("kernel", ""))
    if not m:
      rows.append(
        [
          r["layout"],
          impl,
          str(r["length"]),
          "",
          "",
          "",
          "",
          "",
          "",
          "",
          "NO",
          _not_measured(r) or r.get("kernel_error", ""),
        ]
      )
      continue
    rel = [
      _e(m[o]["rel_l2"]) + (f" ({_e(base[o]['rel_l2'])})" if o in base else "")
      for o in ("out", "dq", "dk", "dv")
    ]
    rows.append(
      [
        r["layout"],
        impl,
        str(r["length"]),
        f"{r['allowed_fraction']:.3f}",
        *rel,
        _e(max(x["max_abs"] for x in m.values())),
        _f(all(x["padding_zero"] for x in m.values())),
        _f(r.get("pass")),
        f"compile {r['kernel_s']['compile']:.1f} s",
      ]
    )
  header = [
    "row",
    "impl",
    "L",
    "allowed",
    "out rel err (xla bf16)",
    "dq",
    "dk",
    "dv",
    "max abs err",
    "padding 0",
    "pass",
    "note",
  ]
  lines = [
    f"Each row's implementation (`{res.get('kernel')}`; `cudnn` on text-only rows), bf16 "
    f"inputs, against the reference in fp32 on the same inputs; relative L2 error "
    f"||x - ref|| / ||ref||, pass below {res.get('tolerance_rel_l2')}, finite, and "
    "padding rows exactly 0. In brackets, where measured: plain XLA attention in bf16 "
    "against the same reference."
  ]
  return lines + _table(header, [[c for c in row] for row in rows])


def md_kernel_speed(res: dict) -> list[str]:
  rows = res.get("rows", [])
  key = lambda r, impl=None: (r.get("layout", "neo"), r["length"], impl or r["impl"], r["mode"])
  by = {key(r): r for r in rows if "ms" in r}
  kernel = res.get("kernel")
  out = []
  for r in rows:
    layout = r.get("layout", "neo")
    if "ms" not in r:
      out.append(
        [layout, str(r["length"]), r["impl"], r["mode"], "", "", "", "", "", _not_measured(r)[:120]]
      )
      continue
    ratio = lambda other, r=r: (
      f"{r['useful_tflops'] / by[other]['useful_tflops']:.2f}"
      if other in by and r["impl"] == kernel
      else ""
    )
    cudnn = "cudnn" if layout == "text" else "cudnn_causal"
    out.append(
      [
        layout,
        str(r["length"]),
        r["impl"],
        r["mode"],
        f"{r['ms']:.2f}",
        f"{r['useful_tflops']:.1f}",
        f"{r['dense_equiv_tflops']:.1f}",
        ratio(key(r, cudnn)),
        ratio(key(r, "xla")) or ratio(key(r, "xla_chunked")),
        f"compile {r['compile_s']:.1f} s",
      ]
    )
  header = [
    "row",
    "L",
    "impl",
    "mode",
    "ms",
    "useful TFLOP/s",
    "dense-equiv TFLOP/s",
    "kernel / cuDNN",
    "kernel / xla (chunked if no dense)",
    "note",
  ]
  shape = res.get("shape", {})
  return [
    f"One packed row ({shape.get('heads')} / {shape.get('kv_heads')} heads, widths "
    f"{shape.get('dqk')} / {shape.get('dv')}, bf16): neo = NEO-like samples (image + "
    f"text), text = text-only samples; useful counts the allowed pairs (cudnn_causal: "
    f"its causal pairs, V padded to {shape.get('dqk')}); ratios are useful TFLOP/s, "
    "against cudnn_causal on neo rows and against impl cudnn on the same text row."
  ] + _table(header, out)


def md_block_sweep(res: dict) -> list[str]:
  out = []
  for r in res.get("rows", []):
    out.append(
      [
        r["block_sizes"].replace("BlockSizes", ""),
        f"{r['ms']:.2f}" if "ms" in r else "",
        f"{r['useful_tflops']:.1f}" if "ms" in r else "",
        "default" if r.get("default") else "",
        _not_measured(r)[:120],
      ]
    )
  lines = [f"`{res.get('kernel')}` fwd+bwd at L={res.get('length')}."]
  lines += _table(["BlockSizes", "ms", "useful TFLOP/s", "", "error"], out)
  best = res.get("best")
  if best:
    speedup = best.get("speedup_vs_default")
    lines += [
      "",
      f"Best: `{best['block_sizes']}` ({best['ms']:.2f} ms"
      + (f", {speedup:.2f}x the default)" if speedup else ")"),
    ]
  return lines


def md_train_step(res: dict) -> list[str]:
  labels = list(res.get("peaks_tflops", {}))
  out = []
  for r in res.get("rows", []):
    program = r.get("program_memory_gb")
    program = "" if program is None else f"{program:.1f}"
    if "step_s" not in r:
      out.append(
        [
          str(r.get("seq_len")),
          r.get("remat", ""),
          "",
          "",
          "",
          "",
          *[""] * len(labels),
          "",
          program,
          "",
          r.get("attention", ""),
          _not_measured(r)[:120],
        ]
      )
      continue
    out.append(
      [
        str(r["seq_len"]),
        r.get("remat", ""),
        f"{r.get('row_fill', 0):.2f}",
        f"{r['step_s']:.3f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{r['tflops_per_s_per_device']:.1f}",
        *[f"{r['mfu'].get(label, 0):.1%}" for label in labels],
        f"{r['peak_memory_gb']:.1f}",
        program,
        f"{r['compile_s']:.0f}",
        r["attention"],
        r.get("attention_fallback", "")[:120],
      ]
    )
  peaks = ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in res.get("peaks_tflops", {}).items())
  remats = res.get("remats") or [res.get("remat")]
  lines = [
    f"{res.get('model')} with {res.get('layers')} layers ({res.get('prebuffer_layers')} "
    f"pre-Buffer), {res.get('dtype')} compute, {res.get('param_dtype')} master weights, "
    f"remat {', '.join(str(x) for x in remats)}, stage {res.get('stage')}, one packed "
    f"row per step, loss on all positions; MFU = model FLOPs "
    f"(neo_jax.trainer.flops.step_flops) / step time / peak ({peaks or 'no peak known'})."
    f" Peak mem: the process's allocator peak so far; program: XLA's memory analysis of "
    f"the compiled step (arguments + outputs - donated + temporaries). State init "
    f"{res.get('init_s')} s."
  ]
  header = (
    ["seq", "remat", "row fill", "step s", "tokens/s", "model TFLOP/s"]
    + [f"MFU ({x})" for x in labels]
    + ["peak mem GB", "program GB", "compile s", "attention", "note"]
  )
  return lines + _table(header, out)


def md_generate(res: dict) -> list[str]:
  out = []
  for r in res.get("rows", []):
    if "prefill_s" not in r:
      out.append([str(r.get("batch")), "", "", "", "", "", _not_measured(r)[:120]])
      continue
    out.append(
      [
        str(r["batch"]),
        f"{r['prompt_tokens_per_row']} ({r['padded_prompt_len']})",
        f"{r['prefill_tokens_per_s']:,.0f}",
        f"{r['decode_tokens_per_s']:,.1f}",
        f"{r['decode_ms_per_step']:.2f}",
        f"{r['compile_prefill_s']:.1f} / {r['compile_decode_s']:.1f}",
        "",
      ]
    )
  lines = [
    f"{res.get('model')} ({res.get('layers')} layers, random weights, {res.get('dtype')},"
    f" attention {res.get('attention')}): one image of {res.get('image_tokens')} visual "
    f"tokens + {res.get('text_tokens')} text tokens, {res.get('new_tokens')} new tokens."
  ]
  header = [
    "batch",
    "prompt (padded)",
    "prefill tok/s",
    "decode tok/s",
    "ms / decode step",
    "compile + 1st s (prefill / decode)",
    "note",
  ]
  return lines + _table(header, out)


def md_mosaic_probe(res: dict) -> list[str]:
  if res.get("reason"):
    return [f"skipped: {res['reason']}"]
  out = []
  for r in res.get("rows", []):
    stages = [s for s in ("lowered", "compiled", "ran") if r.get(s)]
    note = r.get("error", "") + (f" (at {r['where']})" if r.get("where") else "")
    if "max_abs_diff_vs_triton" in r:
      note = f"max |Mosaic - Triton| = {r['max_abs_diff_vs_triton']:.2e}"
    if "correct" in r:
      note = f"correct: {_f(r['correct'])}"
    out.append([r["probe"], ", ".join(stages) or "nothing", note[:400]])
  return [f"Pallas Mosaic GPU backend ({res.get('mode')}; through {res.get('route')})."] + _table(
    ["probe", "reached", "error / check"], out
  )


RENDER: dict[str, Callable[[dict], list[str]]] = {
  "env": md_env,
  "kernel_check": md_kernel_check,
  "kernel_speed": md_kernel_speed,
  "block_sweep": md_block_sweep,
  "train_step": md_train_step,
  "generate": md_generate,
  "mosaic_probe": md_mosaic_probe,
}


def markdown(report: dict) -> str:
  env = report["parts"].get("env", {}).get("result", {})
  smoke = ", SMOKE mode: tiny shapes, numbers mean nothing" if report["smoke"] else ""
  lines = [
    f"# device-check {report['date']}: {report['device']}",
    "",
    f"Command: `{report['command']}` (budget {report['budget_s']:.0f} s, wall "
    f"{report['wall_s']:.0f} s{smoke}).",
    f"Machine: {env.get('device_kind', '?')}, {env.get('host', report['host'])}; "
    f"jax {env.get('jax', '?')}."
    + (
      " Compile times are with a compilation cache shared by the parts: a program "
      "that an earlier part compiled loads from it."
      if report["compilation_cache"]
      else ""
    ),
    "",
  ]
  status = []
  for name, rec in report["parts"].items():
    note = rec.get("log_tail", "").strip().splitlines()[-1:] if rec["status"] != "ok" else []
    status.append(
      [
        name,
        rec["status"],
        _f(rec.get("wall_s")),
        _f(rec.get("budget_s")),
        _f(rec.get("compile_s")),
        _f(rec.get("run_s")),
        (note[0] if note else "")[:160],
      ]
    )
  lines += _table(
    ["part", "status", "wall s", "budget s", "compile s", "run s", "last log line"], status
  )
  for name, rec in report["parts"].items():
    render = RENDER.get(name)
    if not render or not rec.get("result"):
      continue
    lines += ["", f"## {name}" + ("" if rec["status"] == "ok" else f" ({rec['status']})"), ""]
    try:
      lines += render(rec["result"])
    except Exception as e:  # noqa: BLE001 - a rendering bug must not lose the report
      lines.append(f"(could not render: {type(e).__name__}: {e}; the JSON has the data)")
  return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------


def missing_modules(names: tuple[str, ...] = REQUIRED_MODULES) -> list[str]:
  """The names among `names` this interpreter cannot import (find_spec: nothing is imported,
  so this process still never holds the device)."""
  missing = []
  for name in names:
    try:
      found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or blocked in sys.modules
      found = False
    if not found:
      missing.append(name)
  return missing


def parse_part_budgets(items: list[str]) -> dict[str, float]:
  out = {}
  for item in items:
    name, _, value = item.partition("=")
    out[name] = float(value)
  return out


def write_reports(
  report: dict, md: str, results_dir: str, out_dirs: list[str], work: str
) -> list[str]:
  os.makedirs(results_dir, exist_ok=True)
  stem = f"{report['date']}-{slug(report['device'])}" + ("-smoke" if report["smoke"] else "")
  base, n = stem, 2
  while os.path.exists(os.path.join(results_dir, stem + ".json")):
    stem, n = f"{base}-{n}", n + 1
  written = []
  for d in [results_dir] + out_dirs:
    os.makedirs(d, exist_ok=True)
    for ext, text in ((".json", json.dumps(report, indent=1, default=str)), (".md", md)):
      path = os.path.join(d, stem + ext)
      with open(path, "w") as f:
        f.write(text)
      written.append(path)
    if d != results_dir:  # the parts' logs, in one file, travel with the extra copies only
      path = os.path.join(d, stem + "-logs.txt")
      with open(path, "w") as out:
        for name in report["parts"]:
          out.write(f"===== {name} =====\n")
          log = os.path.join(work, f"{name}.log")
          if os.path.exists(log):
            with open(log, errors="replace") as f:
              shutil.copyfileobj(f, out)
      written.append(path)
  return written


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    "--budget-s",
    type=float,
    default=DEFAULT_BUDGET_S,
    help="total wall time; parts get shares of it (default 480)",
  )
  ap.add_argument(
    "--parts",
    default=",".join(PARTS),
    help=f"comma-separated, in order (default: {','.join(PARTS)})",
  )
  ap.add_argument(
    "--part-budget",
    action="append",
    default=[],
    metavar="NAME=SECONDS",
    help="fix one part's time limit; the others share the rest",
  )
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (automatic on CPU)")
  ap.add_argument(
    "--layers",
    type=int,
    default=0,
    help="model depth for train_step and generate (0: the preset's, 40 for neo_2b)",
  )
  ap.add_argument("--kernel", choices=("pallas_gpu", "pallas_tpu"), default=None)
  ap.add_argument(
    "--no-compile-cache",
    action="store_true",
    help="don't share jax's persistent compilation cache (a fresh temporary "
    "directory) between the parts",
  )
  for name, text in PART_OPTIONS.items():
    ap.add_argument(f"--{name}", default=None, help=text)
  ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
  ap.add_argument(
    "--out-dir",
    action="append",
    default=[],
    help="also write the reports and the parts' logs (one file) here",
  )
  args = ap.parse_args(argv)
  missing = missing_modules()
  if missing:
    print(
      f"[device-check] {sys.executable} cannot import {', '.join(missing)}: every part needs "
      f"them, so none was started.\n  {CARRY_HINT}",
      file=sys.stderr,
    )
    return 2

  t_start = time.perf_counter()
  names = [n for n in args.parts.split(",") if n]
  fixed = parse_part_budgets(args.part_budget)
  share = shares(names, args.budget_s, fixed)
  extra = (["--smoke"] if args.smoke else []) + ["--layers", str(args.layers)]
  if args.kernel:
    extra += ["--kernel", args.kernel]
  for name in PART_OPTIONS:
    value = getattr(args, name.replace("-", "_"))
    if value is not None:
      extra += [f"--{name}", value]
  work = tempfile.mkdtemp(prefix="device_check_")
  cache_dir = None if args.no_compile_cache else os.path.join(work, "jax_cache")
  env = part_env(cache_dir)
  parts: dict[str, dict] = {}
  scheduled = 0.0  # cumulative share: part i must end by then (measured from the start)
  print(
    f"[device-check] budget {args.budget_s:.0f} s; parts: "
    + ", ".join(f"{n} {share[n]:.0f} s" for n in names),
    flush=True,
  )
  try:
    for name in names:
      scheduled += share[name]
      elapsed = time.perf_counter() - t_start
      timeout = min(scheduled - elapsed, args.budget_s - RESERVE_S - elapsed)
      if timeout < MIN_START_S:
        parts[name] = {"status": "not run: total budget spent", "budget_s": 0.0, "result": {}}
        print(f"[device-check] {name}: not run (budget spent)", flush=True)
        continue
      part_extra = list(extra)
      peak = parts.get("env", {}).get("result", {}).get("bf16_matmul", {}).get("median_tflops")
      if name == "train_step" and peak:
        part_extra += ["--peak-tflops", f"{peak:.3f}"]
      print(f"[device-check] {name}: running (limit {timeout:.0f} s)", flush=True)
      rec = run_part(name, timeout, work, part_extra, env)
      parts[name] = rec
      print(f"[device-check] {name}: {rec['status']} in {rec['wall_s']:.1f} s", flush=True)
      if rec["status"] != "ok" and rec.get("log_tail"):
        print(
          "\n".join("    " + line for line in rec["log_tail"].rstrip().splitlines()[-8:]),
          flush=True,
        )
  except KeyboardInterrupt:
    print("[device-check] interrupted: writing what was measured", flush=True)

  env_res = parts.get("env", {}).get("result", {})
  smoke = bool(
    args.smoke or env_res.get("smoke") or any(rec.get("smoke") for rec in parts.values())
  )
  report = {
    "date": datetime.date.today().isoformat(),
    "device": env_res.get("device_kind") or "unknown device",
    "backend": env_res.get("backend"),
    "smoke": smoke,
    "command": " ".join(
      [os.path.basename(sys.executable)]
      + [os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)]
      + sys.argv[1:]
    ),
    "argv": sys.argv,
    "budget_s": args.budget_s,
    "wall_s": round(time.perf_counter() - t_start, 1),
    "host": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cpus, Python "
    f"{platform.python_version()}",
    "layers_arg": args.layers,
    "compilation_cache": bool(cache_dir),
    "parts": parts,
  }
  md = markdown(report)
  written = write_reports(report, md, args.results_dir, args.out_dir, work)
  shutil.rmtree(work, ignore_errors=True)
  print()
  print(md)
  good = sum(rec["status"] in ("ok", "skipped") for rec in parts.values())
  print(f"[device-check] {good} of {len(names)} parts ok; wrote " + ", ".join(written))
  return 0  # a failing part is a finding, reported above; the run itself succeeded


if __name__ == "__main__":
  sys.exit(main())
