"""Peak host memory per process when loading a starting checkpoint, whole vs sharded.

    .venv/bin/python benchmarks/sharded_load.py [--out DIR] [--hidden 1024 --layers 12]

Writes an HF NEO checkpoint (safetensors, fp32) and a neo-jax training run directory (orbax)
of a NEO scaled to ~1 GB, then, for each format, starts 2 processes x 4 virtual CPU devices
(jax.distributed over localhost, mesh fsdp=8: every weight split over both processes) that
load it the way a training run starts:

  whole    the whole tree read into host memory, then placed on the shardings
  sharded  `load_initial_params(..., shardings=...)`: each process reads only the slices its
           devices hold (safetensors: a slice of a tensor at a time, pages released after;
           orbax: restored straight onto the shardings)

and reports each process's peak resident memory (ru_maxrss) above what it held before loading.
On CPU the devices' arrays are host memory too, so a process's share is half the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _config(hidden: int, layers: int):
  from neo_jax.config import tiny

  heads = hidden // 64
  return tiny(
    hidden_size=hidden,
    intermediate_size=3 * hidden,
    num_hidden_layers=layers,
    num_prebuffer_layers=2,
    num_attention_heads=heads,
    num_key_value_heads=heads // 2,
    head_dim=64,
    vision_hidden_size=hidden,
    vocab_size=32000,
    img_context_token_id=31999,
    img_start_token_id=31998,
    img_end_token_id=31997,
    eos_token_id=31996,
    pad_token_id=31995,
    param_dtype="float32",
  )


def make(root: Path, hidden: int, layers: int) -> dict:
  """The HF NEO directory and a run directory holding the same parameters."""
  import jax

  jax.config.update("jax_num_cpu_devices", 8)
  import numpy as np

  from neo_jax import run_dir
  from neo_jax.convert.hf_checkpoint import write_hf_neo
  from neo_jax.model import init_params
  from neo_jax.trainer import checkpoint as ckpt_lib
  from neo_jax.trainer.state import TrainState

  config = _config(hidden, layers)
  shutil.rmtree(root / "run", ignore_errors=True)
  params = jax.device_get(init_params(config, jax.random.key(0)))
  write_hf_neo(str(root / "hf"), params, config, progress=False, overwrite=True)
  run_dir.write_run_files(
    str(root / "run"), config, json.dumps({"model": dataclasses.asdict(config)})
  )
  # saved as a training run saves it: each array in the chunks of its shards (fsdp=8)
  from neo_jax.parallel import make_mesh
  from neo_jax.trainer.state import param_shardings

  placed = jax.device_put(params, param_shardings(config, make_mesh(1, 8, 1)))
  ckpt = ckpt_lib.RunCheckpointer(str(root / "run"), async_save=False)
  ckpt.save(TrainState(step=np.int32(1), params=placed, opt_state={}, rng=np.zeros(2, "u4")))
  ckpt.close()
  return {
    "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
    "bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
  }


def worker(root: str, fmt: str, mode: str, port: int, pid: int, out: str) -> int:
  import jax

  jax.config.update("jax_num_cpu_devices", 4)
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
  from neo_jax.parallel import make_mesh
  from neo_jax.trainer import checkpoint as ckpt_lib
  from neo_jax.trainer.state import param_shardings

  mesh = make_mesh(1, 8, 1)
  fn = lambda config: param_shardings(config, mesh)
  path = os.path.join(root, "hf" if fmt == "hf" else "run")
  model = ckpt_lib.run_dir.run_model_config(os.path.join(root, "run"))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t0 = time.perf_counter()
  if mode == "sharded":
    params, config = ckpt_lib.load_initial_params(path, "neo", model, shardings=fn)
  else:  # the whole tree on the host first
    host, config = ckpt_lib.load_initial_params(path, "neo", model)
    params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, x.__getitem__), host, fn(config)
    )
  jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  local = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
  with open(out, "w") as f:
    json.dump(
      {
        "rss_before_mb": before / 1024,
        "peak_rss_mb": peak / 1024,
        "peak_increase_mb": (peak - before) / 1024,
        "local_shards_mb": local / 2**20,
        "seconds": seconds,
      },
      f,
    )
  return 0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="directory for the checkpoints (default tmp)")
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=12)
  args = parser.parse_args()
  root = Path(args.out or tempfile.mkdtemp(prefix="sharded_load_"))
  root.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
  made = subprocess.run(
    [sys.executable, __file__, "make", str(root), str(args.hidden), str(args.layers)],
    env=env,
    capture_output=True,
    text=True,
  )
  if made.returncode:
    print(made.stderr[-3000:])
    return 1
  model = json.loads(made.stdout.strip().splitlines()[-1])
  print(
    f"model: {model['params'] / 1e6:.0f} M parameters, {model['bytes'] / 2**20:.0f} MiB "
    f"fp32; 2 processes x 4 CPU devices, mesh fsdp=8"
  )
  rows = []
  for fmt in ("hf", "run"):
    for mode in ("whole", "sharded"):
      port = _free_port()
      procs = [
        subprocess.Popen(
          [
            sys.executable,
            __file__,
            "worker",
            str(root),
            fmt,
            mode,
            str(port),
            str(pid),
            str(root / f"{fmt}_{mode}_{pid}.json"),
          ],
          env=env,
        )
        for pid in range(2)
      ]
      if any(p.wait() for p in procs):
        return 1
      results = [json.loads((root / f"{fmt}_{mode}_{pid}.json").read_text()) for pid in (0, 1)]
      rows.append((fmt, mode, results))
      print(
        f"{fmt:4s} {mode:8s} peak RSS increase per process: "
        + ", ".join(f"{r['peak_increase_mb']:.0f} MiB" for r in results)
        + f" (its share {results[0]['local_shards_mb']:.0f} MiB; "
        f"{max(r['seconds'] for r in results):.1f} s)"
      )
  with open(root / "sharded_load.json", "w") as f:
    json.dump({"model": model, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "make":
    print(json.dumps(make(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
    sys.exit(0)
  if len(sys.argv) > 1 and sys.argv[1] == "worker":
    a = sys.argv[2:]
    sys.exit(worker(a[0], a[1], a[2], int(a[3]), int(a[4]), a[5]))
  sys.exit(main())
