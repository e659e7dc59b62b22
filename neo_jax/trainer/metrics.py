"""Where a run's metrics go: metrics.jsonl and TensorBoard event files in the run directory.

One JSON record per write, {"step": N, "train/loss": ..., ...}; NaN / Inf are kept (JSONL
writes them as NaN / Infinity, TensorBoard skips them). Only process 0 writes; every process
keeps the records it was given in `history` (what `Trainer.run` returns). A resumed run first
drops the records after the step it resumes from (`drop_records_after`), so that the steps it
redoes appear once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from tensorboard.summary import Writer

from neo_jax import run_dir


class MetricWriter:
  """Scalars to WORKDIR/metrics.jsonl and TensorBoard event files (no TensorFlow needed)."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.workdir, self.enabled, self.tensorboard = workdir, enabled, tensorboard
    self.history: list[dict] = []  # every record written, as {"step": N, ...}
    self._jsonl = None
    self._tb = None

  def _open(self) -> None:  # on the first write: a writer that writes nothing creates nothing
    self._jsonl = run_dir.open_append(self.workdir, run_dir.METRICS_FILE)
    if self.tensorboard:
      self._tb = Writer(str(run_dir.path(self.workdir, run_dir.TENSORBOARD_DIR)))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    self.history.append({"step": int(step), **metrics})
    if not self.enabled:
      return
    if self._jsonl is None:
      self._open()
    clean = {k: _number(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in clean.items():
        if value is not None and math.isfinite(value):
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _number(value: Any) -> float | None:
  """A float (NaN / Inf kept: JSONL writes them as NaN / Infinity, TensorBoard skips them)."""
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError):
    return None


def drop_records_after(workdir: str, step: int) -> int:
  """Removes from WORKDIR/metrics.jsonl the records of steps after `step` (and a line cut off
  by a killed process); returns how many lines went. The file is replaced atomically."""
  target = run_dir.path(workdir, run_dir.METRICS_FILE)
  if not target.is_file():
    return 0
  lines = [
    line
    for line in target.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    if line.strip()
  ]
  kept = [line for line in lines if _record_step(line) is not None and _record_step(line) <= step]
  if len(kept) == len(lines):
    return 0
  text = "".join(line if line.endswith("\n") else line + "\n" for line in kept)
  if run_dir.is_remote(workdir):  # an object is replaced whole by its write
    target.write_text(text)
  else:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)
  return len(lines) - len(kept)


def _record_step(line: str) -> int | None:
  try:
    record = json.loads(line)
  except ValueError:
    return None
  step = record.get("step") if isinstance(record, dict) else None
  return step if isinstance(step, int) else None


def read_jsonl(path: str) -> list[dict]:
  """All records of a metrics.jsonl (for tests, notebooks and the demo report)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
