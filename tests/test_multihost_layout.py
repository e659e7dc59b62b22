"""Batches fed by batch shard: tensor parallelism across processes trains on the right rows.

Real processes train the tiny `local` pretrain stage for a few updates with a mesh whose
tensor axis spans processes, and must match one process with the same mesh on virtual devices
(losses within 1e-5, the global batch of the same rows):

  - 2 processes x 1 device, mesh tensor=2: both processes hold the one batch shard;
  - (slow) 2 processes x 2 devices, mesh fsdp=2 x tensor=2.

A third launch, one process with 16 virtual devices, lays out the shipped configs (neo_2b,
neo_9b on abstract shapes, and the tiny ones) without any override: the topology of both
launch scripts.

The same file is the worker: `python tests/test_multihost_layout.py MODE ...` runs one process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_multihost import _env, _free_port, _run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "pretrain.py") + ":tiny,local"
STEPS = 3
OVERRIDES = (
  f"--config.total_steps={STEPS}",
  "--config.mesh.num_devices=0",
  "--config.checkpoint.every_steps=1000",
  "--config.log.tensorboard=false",
  "--config.checkpoint.async_save=false",
)
# (name, processes, devices per process, data, fsdp, tensor)
MESHES = [("tensor2", 2, 1, 1, 1, 2), ("fsdp2_tensor2", 2, 2, 1, 2, 2)]
MESH_BY_NAME = {m[0]: m for m in MESHES}


SEEN: list = []  # what the wrapped step saw, one entry per update


def _record_batches(out) -> None:
  """Wraps Trainer._train_step so each process records its rows and the global batch in
  `out()`_p<process>.json after every update."""
  import jax

  from neo_jax.parallel import shard_batch
  from neo_jax.trainer import loop

  original = loop.Trainer._train_step

  def train_step(self, arrays):
    ids = shard_batch({"input_ids": arrays["input_ids"]}, self.mesh)["input_ids"]
    SEEN.append(
      {
        "local_rows": int(arrays["input_ids"].shape[0]),
        "local_sum": int(np.asarray(arrays["input_ids"], np.int64).sum()),
        "layout": [self.layout.rows, list(self.layout.held), self.layout.group, self.layout.groups],
        "global_rows": int(ids.shape[0]),
        "global_sum": int(jax.jit(lambda x: x.sum())(ids)),
      }
    )
    with open(f"{out()}_p{jax.process_index()}.json", "w") as f:
      json.dump(SEEN, f)
    return original(self, arrays)

  loop.Trainer._train_step = train_step


def worker_train(
  workdir: str, out: str, devices: int, mesh: list[int], port: int, processes: int, process_id: int
) -> int:
  import jax

  jax.config.update("jax_num_cpu_devices", devices)
  _record_batches(lambda: out)
  from neo_jax.cli import main

  group = (
    []
    if processes == 1
    else [
      "--coordinator",
      f"127.0.0.1:{port}",
      "--num-processes",
      str(processes),
      "--process-id",
      str(process_id),
    ]
  )
  data, fsdp, tensor = mesh
  return main(
    [
      "train",
      "--config",
      CONFIG,
      *group,
      f"--config.workdir={workdir}",
      f"--config.mesh.data={data}",
      f"--config.mesh.fsdp={fsdp}",
      f"--config.mesh.tensor={tensor}",
      *OVERRIDES,
    ]
  )


def worker_reference(root: str, name: str) -> int:
  """One process with as many virtual devices as the mesh `name` of MESHES has."""
  import jax

  _, processes, devices, data, fsdp, tensor = MESH_BY_NAME[name]
  jax.config.update("jax_num_cpu_devices", processes * devices)
  _record_batches(lambda: os.path.join(root, f"ref_{name}"))
  from neo_jax.cli import main

  return main(
    [
      "train",
      "--config",
      CONFIG,
      f"--config.workdir={root}/ref_{name}",
      *OVERRIDES,
      f"--config.mesh.data={data}",
      f"--config.mesh.fsdp={fsdp}",
      f"--config.mesh.tensor={tensor}",
    ]
  )


def worker_topology(out: str) -> int:
  """16 virtual devices (a v5litepod-16, or 2 nodes x 8 GPUs): every shipped config's mesh,
  batch layout and shardings, without an override."""
  import jax

  jax.config.update("jax_num_cpu_devices", 16)
  from neo_jax.model import abstract_params
  from neo_jax.parallel import batch_shardings
  from neo_jax.trainer import config as config_lib
  from neo_jax.trainer import optimizer as opt_lib
  from neo_jax.trainer.loop import _make_mesh, run_layout
  from neo_jax.trainer.state import state_shardings

  report = {}
  for spec in (
    "pretrain.py:neo_2b",
    "midtrain.py:neo_2b",
    "sft.py:neo_2b",
    "preference.py:neo_2b",
    "pretrain.py:neo_9b",
    "sft.py:neo_9b",
    "pretrain.py:tiny",
    "sft.py:tiny",
    "preference.py:tiny",
  ):
    config = config_lib.load_config(str(REPO / "configs" / spec))
    mesh = _make_mesh(config)
    layout = run_layout(config, mesh)
    model_config = config_lib.model_config(config)
    abstract = abstract_params(model_config)
    trainable = opt_lib.trainable_paths(
      abstract, tuple(config.trainable) or opt_lib.stage_patterns(config.stage)
    )
    tx, _ = opt_lib.from_config(config.optimizer, config.total_steps)
    shardings = state_shardings(
      model_config, tx, trainable, mesh, config_lib.sharding_rules(config)
    )
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings.params)):
      s.shard_shape(a.shape)  # raises when a split does not divide
    micro = {
      "input_ids": np.zeros((layout.rows // config.grad_accum_steps, config.data.seq_len), np.int32)
    }
    batch_sharding = batch_shardings(micro, mesh)["input_ids"]
    shard = batch_sharding.shard_shape(micro["input_ids"].shape)
    report[spec] = {
      "mesh": dict(mesh.shape),
      "rows": layout.rows,
      "accum": config.grad_accum_steps,
      "local_rows": layout.local_rows,
      "shard_rows": shard[0],
    }
  with open(out, "w") as f:
    json.dump(report, f)
  return 0


# --- the test side ------------------------------------------------------------------------------


def _losses(workdir: Path) -> list[float]:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["train/loss"] for r in records]


@pytest.mark.parametrize(
  "mesh", [MESHES[0], pytest.param(MESHES[1], marks=pytest.mark.slow)], ids=[m[0] for m in MESHES]
)
def test_tensor_across_processes_trains_like_one_process(mesh, tmp_path):
  name, processes, devices, data, fsdp, tensor = mesh
  reference = tmp_path / "ref"
  reference.mkdir()
  _run([(["reference", str(reference), name], _env())], reference, __file__)
  port = _free_port()
  out = str(tmp_path / "rows")
  _run(
    [
      (
        [
          "train",
          str(tmp_path / "run"),
          out,
          str(devices),
          f"{data},{fsdp},{tensor}",
          str(port),
          str(processes),
          str(pid),
        ],
        _env(),
      )
      for pid in range(processes)
    ],
    tmp_path,
    __file__,
  )
  ref = json.loads((reference / f"ref_{name}_p0.json").read_text())
  seen = [json.loads((tmp_path / f"rows_p{pid}.json").read_text()) for pid in range(processes)]
  rows = 8  # the local variant's batch
  for step in range(STEPS):
    mine = [s[step] for s in seen]
    # every process builds the global batch of all the rows, the same as one process does
    assert all(m["global_rows"] == rows == ref[step]["global_rows"] for m in mine)
    assert all(m["global_sum"] == ref[step]["global_sum"] for m in mine)
    if fsdp == 1:  # the tensor group spans both processes: both feed every row
      assert [m["local_rows"] for m in mine] == [rows, rows]
      assert mine[0]["local_sum"] == mine[1]["local_sum"] == ref[step]["local_sum"]
      assert mine[0]["layout"] == [rows, [0], 0, 1]
    else:  # each process holds one fsdp shard (both tensor halves of it)
      assert [m["local_rows"] for m in mine] == [rows // 2, rows // 2]
      assert sum(m["local_sum"] for m in mine) == ref[step]["local_sum"]
      assert sorted(m["layout"][1] for m in mine) == [[0], [1]]
  np.testing.assert_allclose(
    _losses(tmp_path / "run"), _losses(reference / f"ref_{name}"), rtol=0, atol=1e-5
  )


def test_shipped_configs_fit_sixteen_devices_without_overrides(tmp_path):
  out = tmp_path / "topology.json"
  _run([(["topology", str(out)], _env())], tmp_path, __file__)
  report = json.loads(out.read_text())
  for spec, r in report.items():
    assert r["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}, spec
    assert r["shard_rows"] * 16 * r["accum"] == r["rows"] and r["local_rows"] == r["rows"]
  # NEO's one packed row per device, with its accumulation: 16 rows per micro-batch
  assert report["pretrain.py:neo_2b"]["rows"] == 16 * 5
  assert report["sft.py:neo_9b"]["rows"] == 16
  assert report["pretrain.py:tiny"]["rows"] == 32 * 16  # the tiny demo's 32 rows per shard


if __name__ == "__main__":
  mode, rest = sys.argv[1], sys.argv[2:]
  if mode == "train":
    sys.exit(
      worker_train(
        rest[0],
        rest[1],
        int(rest[2]),
        [int(x) for x in rest[3].split(",")],
        int(rest[4]),
        int(rest[5]),
        int(rest[6]),
      )
    )
  if mode == "reference":
    sys.exit(worker_reference(rest[0], rest[1]))
  if mode == "topology":
    sys.exit(worker_topology(rest[0]))
  raise SystemExit(f"unknown mode {mode!r}")
