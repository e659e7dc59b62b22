"""Where a run's metrics go: metrics.jsonl and TensorBoard event files in the run directory.

One JSON record per write, {"step": N, "train/loss": ..., ...}; NaN / Inf are kept (JSONL
writes them as NaN / Infinity, TensorBoard skips them). Only process 0 writes; every process
keeps the records it was given in `history` (what `Trainer.run` returns).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

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


def _number(value: Any) -> Optional[float]:
  """A float (NaN / Inf kept: JSONL writes them as NaN / Infinity, TensorBoard skips them)."""
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError):
    return None


def read_jsonl(path: str) -> list[dict]:
  """All records of a metrics.jsonl (for tests, notebooks and the demo report)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
