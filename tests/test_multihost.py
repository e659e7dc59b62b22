"""Multi-process training on CPU: real processes, a real coordinator, the real `neo-jax train`.

Two processes with 4 virtual CPU devices each (gloo collectives) join through a coordinator
on a free loopback port and
  - train the tiny pretrain config for a few steps with parameters split over all 8 devices
    (mesh fsdp=8, so every weight spans both processes), saving a checkpoint; each process
    writes the shards of the state it holds when the checkpoint is taken;
  - then, in the same group, read one epoch of a JSONL source through the trainer's data path,
    each process its own shard.
Then one process with another mesh (8 local devices, data=2 fsdp=2 tensor=2; and one device)
restores the checkpoint and must get the saved state bit for bit.

The same file is the worker: `python tests/test_multihost.py MODE ...` runs one process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "pretrain.py") + ":tiny"
STEPS = 3
# the tiny pretrain config, shrunk: 8 rows of 64 tokens, K = 16, one checkpoint at the end
TRAIN_OVERRIDES = (
  f"--config.total_steps={STEPS}",
  "--config.data.batch_size=8",
  "--config.data.seq_len=64",
  "--config.data.visual_budget=16",
  "--config.loss.positions_per_row=16",
  "--config.loss.chunk_size=16",
  "--config.optimizer.warmup_steps=1",
  "--config.checkpoint.every_steps=100",
  "--config.log.every_steps=1",
  "--config.log.progress_bar=false",
  "--config.log.tensorboard=false",
  "--config.mesh.data=1",
  "--config.mesh.fsdp=8",
  "--config.mesh.tensor=1",
)
# fast: random packed batches (the config's synthetic pipeline) and a 512-token vocabulary;
# slow: the embedded easy-vqa captions through grain with Qwen3's 151,936-token vocabulary
VARIANTS = {
  "synthetic": (
    "--config.data.pipeline=synthetic",
    "--config.model.vocab_size=512",
    "--config.model.img_context_token_id=511",
    "--config.model.img_start_token_id=510",
    "--config.model.img_end_token_id=509",
    "--config.model.eos_token_id=508",
    "--config.model.pad_token_id=507",
  ),
  "easy_vqa": (),
}
N_RECORDS = 37  # odd: the two shards differ in size
WORKER_TIMEOUT_S = 240


# --- the worker side ----------------------------------------------------------------------------


def _save_state_shards(out_dir: str) -> None:
  """Wraps RunCheckpointer.save so each process records the state shards it holds."""
  import jax

  from neo_jax.trainer import checkpoint as ckpt_lib

  original = ckpt_lib.RunCheckpointer.save

  def save(self, state, data_state=None, meta=None):
    arrays, index, info = {}, {}, {}
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    for path, leaf in flat:
      name = jax.tree_util.keystr(path)
      shards = [s for s in leaf.addressable_shards if s.replica_id == 0]
      info[name] = {
        "shape": list(leaf.shape),
        "fully_addressable": leaf.is_fully_addressable,
        "local_shards": len(leaf.addressable_shards),
      }
      for shard in shards:
        key = f"a{len(arrays)}"
        arrays[key] = np.asarray(shard.data)
        index[key] = [name, [[sl.start, sl.stop] for sl in _slices(shard.index, leaf.shape)]]
    pid = jax.process_index()
    np.savez(os.path.join(out_dir, f"state_p{pid}.npz"), **arrays)
    with open(os.path.join(out_dir, f"state_p{pid}.json"), "w") as f:
      json.dump(
        {
          "index": index,
          "info": info,
          "step": int(jax.device_get(state.step)),
          "data_state": data_state,
        },
        f,
      )
    return original(self, state, data_state, meta)

  ckpt_lib.RunCheckpointer.save = save


def _slices(index: tuple, shape: tuple) -> list[slice]:
  return [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]


def worker_train(
  process_id: int, port: int, workdir: str, out_dir: str, source: str, extra: Sequence[str] = ()
) -> int:
  """`neo-jax train` in a group of two, then (same group) one epoch of `source`."""
  import jax

  jax.config.update("jax_num_cpu_devices", 4)  # before the backend starts
  _save_state_shards(out_dir)
  from neo_jax.cli import main

  rc = main(
    [
      "train",
      "--config",
      CONFIG,
      "--coordinator",
      f"127.0.0.1:{port}",
      "--num-processes",
      "2",
      "--process-id",
      str(process_id),
      f"--config.workdir={workdir}",
      *TRAIN_OVERRIDES,
      *extra,
    ]
  )
  return rc or worker_data(out_dir, source)


def worker_restore(workdir: str, out_dir: str) -> int:
  """One process, 8 devices: restore on a (2, 2, 2) mesh and on one device."""
  import jax

  jax.config.update("jax_num_cpu_devices", 8)
  from neo_jax import run_dir
  from neo_jax.model import abstract_params
  from neo_jax.parallel import make_mesh
  from neo_jax.trainer import checkpoint as ckpt_lib
  from neo_jax.trainer import config as config_lib
  from neo_jax.trainer import optimizer as opt_lib
  from neo_jax.trainer.state import abstract_state, state_shardings

  with open(os.path.join(workdir, "train_config.json")) as f:
    cfg = config_lib.config_from_json(f.read())
  model_config = run_dir.run_model_config(workdir)
  trainable = opt_lib.trainable_paths(abstract_params(model_config), tuple(cfg.trainable))
  tx, _ = opt_lib.from_config(cfg.optimizer, cfg.total_steps)
  mesh = make_mesh(2, 2, 2)
  shardings = state_shardings(model_config, tx, trainable, mesh)
  ckpt = ckpt_lib.RunCheckpointer(workdir, async_save=False, read_only=True)
  state, meta = ckpt.restore(abstract_state(model_config, tx, trainable, shardings))
  ckpt.close()
  arrays, names = {}, {}
  for k, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(state)[0]):
    assert leaf.sharding.is_equivalent_to(  # placed on the new mesh directly
      jax.tree.leaves(shardings)[k], leaf.ndim
    )
    arrays[f"a{k}"], names[f"a{k}"] = np.asarray(leaf), jax.tree_util.keystr(path)
  params, _ = run_dir.load_run_params(workdir)  # one device
  for k, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
    arrays[f"p{k}"], names[f"p{k}"] = np.asarray(leaf), ".params" + jax.tree_util.keystr(path)
  np.savez(os.path.join(out_dir, "restored.npz"), **arrays)
  with open(os.path.join(out_dir, "restored.json"), "w") as f:
    json.dump(
      {"names": names, "meta": meta, "mesh": dict(mesh.shape), "devices": jax.device_count()}, f
    )
  return 0


def worker_data(out_dir: str, source: str) -> int:
  """One epoch of `source` through the trainer's data path, in the group `train` joined."""
  import jax

  from neo_jax.data.embedded import load_named_tokenizer
  from neo_jax.parallel import distributed, make_mesh, shard_batch
  from neo_jax.trainer import batches as data_lib
  from neo_jax.trainer import config as config_lib

  group = distributed.initialize()  # already joined: returns that group
  cfg = config_lib.load_config(
    CONFIG,
    [
      "--config.data.kind=text",
      f"--config.data.sources=('jsonl:{source}',)",
      "--config.data.batch_size=8",
      "--config.data.seq_len=64",
      "--config.loss.positions_per_row=0",
    ],
  )  # 4 rows per process, one per device
  model_config = config_lib.model_config(cfg)
  tokenizer = load_named_tokenizer(cfg.data.tokenizer)  # the one the pipeline encodes with
  it = data_lib.make_iterator(cfg, model_config, num_epochs=1)
  ids, batches, first = [], 0, None
  for batch in it:
    batches += 1
    first = batch if first is None else first
    for row in batch["input_ids"]:
      ids += [int(x) for x in re.findall(r"record=(\d+);", tokenizer.decode(row.tolist()))]
  # the global batch from each process's rows: every local row on this process's devices
  mesh = make_mesh(1, 8, 1)
  local = {"rows": np.full((first["input_ids"].shape[0], 1), jax.process_index(), np.int32)}
  rows = shard_batch(local, mesh)["rows"]
  placed = [int(s.data[0, 0]) for s in rows.addressable_shards]
  total = int(jax.jit(lambda x: x.sum())(rows))
  with open(os.path.join(out_dir, f"data_p{jax.process_index()}.json"), "w") as f:
    json.dump(
      {
        "ids": ids,
        "batches": batches,
        "stats": it.stats(),
        "group": group.source,
        "process_count": jax.process_count(),
        "placed": placed,
        "global_rows": rows.shape[0],
        "global_sum": total,
      },
      f,
    )
  return 0


# --- the test side ------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("NEO_JAX_", "SLURM_", "TPU_", "JAX_", "XLA_FLAGS"))
  }
  env.update(
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="3",
    PYTHONUNBUFFERED="1",
    NEO_JAX_INIT_TIMEOUT="120",
    PYTHONPATH=str(REPO),
    **extra,
  )
  return env


def _run(
  commands: Sequence[tuple[list[str], dict[str, str]]], log_dir: Path, script: str = __file__
) -> list[str]:
  """Starts the processes (`script` with each command's arguments) together, waits for all;
  returns their logs. Fails on any error."""
  procs = []
  for k, (args, env) in enumerate(commands):
    log = open(log_dir / f"proc{k}.log", "w")
    procs.append(
      (
        subprocess.Popen(
          [sys.executable, script, *args], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        ),
        log,
      )
    )
  deadline = time.monotonic() + WORKER_TIMEOUT_S
  try:
    for proc, _ in procs:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  logs = [(log_dir / f"proc{k}.log").read_text() for k in range(len(procs))]
  for k, (proc, _) in enumerate(procs):
    assert proc.returncode == 0, f"process {k} exited with {proc.returncode}:\n{logs[k][-4000:]}"
  return logs


def _assemble(out_dir: Path, processes: int) -> tuple[dict[str, np.ndarray], dict]:
  """Full arrays from the shards each process saved; checks they tile every array once."""
  full, covered, infos = {}, {}, []
  for pid in range(processes):
    meta = json.loads((out_dir / f"state_p{pid}.json").read_text())
    infos.append(meta)
    with np.load(out_dir / f"state_p{pid}.npz") as shards:
      for key, (name, bounds) in meta["index"].items():
        shape = meta["info"][name]["shape"]
        if name not in full:
          full[name] = np.zeros(shape, shards[key].dtype)
          covered[name] = np.zeros(shape, np.int32)
        where = tuple(slice(a, b) for a, b in bounds)
        full[name][where] = shards[key]
        covered[name][where] += 1
  for name, count in covered.items():
    assert np.all(count == 1), f"{name}: shards do not tile the array exactly once"
  return full, {"info": infos}


def _write_records(path: Path) -> None:
  with open(path, "w") as f:
    for i in range(N_RECORDS):
      f.write(json.dumps({"text": f"record={i:03d}; a short line of text number {i}."}) + "\n")


@pytest.fixture(
  scope="module", params=["synthetic", pytest.param("easy_vqa", marks=pytest.mark.slow)]
)
def two_process_run(request, tmp_path_factory):
  """Two processes train, save, then read one epoch of a JSONL file (one start-up for both)."""
  root = tmp_path_factory.mktemp(f"multihost_{request.param}")
  workdir, out_dir, source = root / "run", root / "out", root / "records.jsonl"
  out_dir.mkdir()
  _write_records(source)
  port = _free_port()
  logs = _run(
    [
      (
        [
          "train",
          str(pid),
          str(port),
          str(workdir),
          str(out_dir),
          str(source),
          *VARIANTS[request.param],
        ],
        _env(),
      )
      for pid in range(2)
    ],
    out_dir,
  )
  return workdir, out_dir, logs, request.param


def test_two_processes_train_with_parameters_split_across_them(two_process_run):
  workdir, out_dir, logs, variant = two_process_run
  assert "finished tiny_vqa_pretrain at step 3" in logs[0] + logs[1]
  # the primary logs the topology; the other process does not
  topo = [line for line in logs[0].splitlines() if "topology:" in line]
  assert topo and "2 process(es), this is 0; 4 local / 8 global cpu devices" in topo[0]
  assert "'fsdp': 2" in topo[0]  # the fsdp axis spans both processes
  assert not any("topology:" in line for line in logs[1].splitlines())
  assert "joining the process group: explicit" in logs[1]
  assert re.search(r"process 1 of 2 joined: 4 local cpu device\(s\) \[[\d, ]+\], 8 global", logs[1])
  # metrics from the primary only, one record per step; the loss is finite
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(np.isfinite(r["train/loss"]) for r in records)
  # each process held half of every split weight and saw its own data position
  meta = [json.loads((out_dir / f"state_p{pid}.json").read_text()) for pid in range(2)]
  embed = next(v for k, v in meta[0]["info"].items() if "embed_tokens" in k and "params" in k)
  assert embed["fully_addressable"] is False and embed["local_shards"] == 4
  assert meta[0]["step"] == meta[1]["step"] == STEPS
  if variant == "easy_vqa":  # grain positions differ per shard (synthetic: the step number)
    assert meta[0]["data_state"] != meta[1]["data_state"]
  # grain wrote one data-state file per process into the checkpoint
  data_files = sorted(p.name for p in (workdir / "checkpoints" / str(STEPS) / "data").iterdir())
  assert len([n for n in data_files if "process" in n or n.endswith(".json")]) >= 2, data_files


def test_another_mesh_restores_the_same_state(two_process_run):
  workdir, out_dir, _, _ = two_process_run
  saved, _ = _assemble(out_dir, 2)
  _run([(["restore", str(workdir), str(out_dir)], _env())], out_dir)
  meta = json.loads((out_dir / "restored.json").read_text())
  assert meta["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and meta["devices"] == 8
  assert meta["meta"]["step"] == STEPS
  names = meta["names"]
  with np.load(out_dir / "restored.npz") as restored:
    state_keys = [k for k in names if k.startswith("a")]
    assert {names[k] for k in state_keys} == set(saved)
    for k in state_keys:  # the whole train state on the (2, 2, 2) mesh
      np.testing.assert_array_equal(restored[k], saved[names[k]], err_msg=names[k])
    param_keys = [k for k in names if k.startswith("p")]
    assert len(param_keys) == len([n for n in saved if n.startswith(".params")])
    for k in param_keys:  # the parameters on one device
      np.testing.assert_array_equal(restored[k], saved[names[k]], err_msg=names[k])
  # training moved the parameters away from their initial values (the check is not vacuous)
  assert float(np.abs(saved[".step"])) == STEPS


def test_processes_read_disjoint_complete_shards_of_an_epoch(two_process_run):
  _, out_dir, _, _ = two_process_run
  results = [json.loads((out_dir / f"data_p{pid}.json").read_text()) for pid in range(2)]
  assert all(r["group"] == "explicit" and r["process_count"] == 2 for r in results)
  a, b = (set(r["ids"]) for r in results)
  assert len(a) == len(results[0]["ids"]) and len(b) == len(results[1]["ids"])  # no repeats
  assert not a & b  # disjoint
  assert a | b == set(range(N_RECORDS))  # complete
  assert {len(a), len(b)} == {N_RECORDS // 2, N_RECORDS // 2 + 1}
  assert all(r["stats"]["samples"] == len(r["ids"]) for r in results)
  # the global batch: each process's rows on its own 4 devices, 8 rows in all
  assert results[0]["placed"] == [0] * 4 and results[1]["placed"] == [1] * 4
  assert results[0]["global_rows"] == 8
  assert results[0]["global_sum"] == results[1]["global_sum"] == 4  # 4 rows of 1 (process 1)


if __name__ == "__main__":
  mode, rest = sys.argv[1], sys.argv[2:]
  if mode == "train":
    sys.exit(worker_train(int(rest[0]), int(rest[1]), rest[2], rest[3], rest[4], rest[5:]))
  if mode == "restore":
    sys.exit(worker_restore(rest[0], rest[1]))
  raise SystemExit(f"unknown mode {mode!r}")
