"""The metric writer: metrics.jsonl and TensorBoard, only on the writing process."""

import json
import math

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from neo_jax.trainer import metrics as M


def test_writer_jsonl_and_tensorboard(tmp_path):
  w = M.MetricWriter(str(tmp_path))
  w.write(1, {"train/loss": 2.5, "perf/mfu": np.float32(0.25)})
  w.write(2, {"train/loss": float("nan")})
  w.close()
  records = M.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert records[0] == {"step": 1, "train/loss": 2.5, "perf/mfu": 0.25}
  assert math.isnan(records[1]["train/loss"])
  acc = EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  loss = acc.Tensors("train/loss")
  assert [e.step for e in loss] == [1]  # non-finite values stay out of TensorBoard
  assert loss[0].tensor_proto.float_val[0] == 2.5


def test_disabled_writer_writes_nothing(tmp_path):
  w = M.MetricWriter(str(tmp_path / "x"), enabled=False)
  w.write(1, {"a": 1.0})
  w.close()
  assert not (tmp_path / "x").exists()


def test_drop_records_after_a_resumed_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "train/loss": float(s)}) for s in (1, 2, 3, 4)]
  path.write_text("\n".join(lines) + "\n" + '{"step": 5, "train/lo')  # killed mid-write
  assert M.drop_records_after(str(tmp_path), 2) == 3
  assert [r["step"] for r in M.read_jsonl(str(path))] == [1, 2]
  assert M.drop_records_after(str(tmp_path), 2) == 0  # nothing to drop: the file is kept
  assert M.drop_records_after(str(tmp_path / "none"), 2) == 0
