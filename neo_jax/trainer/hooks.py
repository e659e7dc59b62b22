"""What happens around each update: NaN policy, throughput, progress, logs, evaluation, saving.

A hook is any callable `hook(info: StepInfo) -> None` (with an optional `close()`), added with
its cadence (`Trainer.add_hook(hook, every=N, first=..., last=..., on_stop=...)`); the loop
calls the due ones after each update, in the order they were added. Each hook below owns one
job and is usable (and tested) on its own:

    NanPolicy       every step: stop on a non-finite loss / gradient norm, or count skips
                    (the count is saved with each checkpoint and fails a run past its share)
    Throughput      every step: step time, tokens/s, TFLOP/s and MFU since its last report
    ProgressBar     every step: tqdm with the loss and learning rate (process 0, if enabled)
    LogMetrics      every log.every_steps (and the first and last step): one record of the
                    step's metrics plus what its sources report (throughput, skips, data, memory)
    Evaluate        every eval.every_steps (and the last step): the evaluators' metrics
    SaveCheckpoint  every checkpoint.every_steps, the last step, and when a stop signal arrives
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from neo_jax.errors import RunError
from neo_jax.trainer.checkpoint import RunCheckpointer
from neo_jax.trainer.metrics import MetricWriter
from neo_jax.trainer.state import TrainState

logger = logging.getLogger("neo_jax.train")


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What a hook sees after an update."""

  step: int  # updates applied, this one included
  state: TrainState  # the state after the update
  metrics: Mapping[str, float]  # the step's metrics on the host (the objective's summary)
  batch: Mapping[str, np.ndarray]  # this process's rows of the step's batch
  data_state: dict | None  # the data iterator's state right after this step's batch
  seconds: float  # wall time of the step, host side
  first: bool  # the first step of this run (it compiles the step)
  last: bool  # the run's final step (total_steps)


class Hook(Protocol):
  def __call__(self, info: StepInfo) -> None: ...


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When a hook runs: every `every` steps (0: never by count), and on the run's first step,
  its last step, or the step a stop signal arrived at, when asked."""

  every: int = 1
  first: bool = False
  last: bool = False
  on_stop: bool = False

  def due(self, info: StepInfo) -> bool:
    return (
      (self.every > 0 and info.step % self.every == 0)
      or (self.first and info.first)
      or (self.last and info.last)
    )


class NonFiniteError(RunError):
  """A step produced a non-finite loss or gradient norm under nan_policy="stop"."""


class SkippedUpdatesError(RunError):
  """A run under nan_policy="skip" skipped more than its allowed share of updates."""


class NanPolicy:
  """Acts on the step's `nonfinite_*` flags (the step has already kept the state unchanged):
  "stop" raises NonFiniteError naming the step, the values and the last checkpoint; "skip"
  counts and warns; "ignore" does nothing (the update was applied).

  `skipped` starts from the count a resumed checkpoint saved (SaveCheckpoint writes it), so
  `train/skipped_steps` and `check_share` cover the whole run, not only its last part.
  """

  def __init__(
    self,
    policy: str,
    last_checkpoint: Callable[[], int | None] = lambda: None,
    *,
    skipped: int = 0,
    max_share: float = 1.0,
  ):
    self.policy, self.last_checkpoint = policy, last_checkpoint
    self.skipped, self.max_share = int(skipped), float(max_share)

  def __call__(self, info: StepInfo) -> None:
    bad = [name for name in ("loss", "grad_norm") if int(info.metrics[f"nonfinite_{name}"])]
    if not bad or self.policy == "ignore":
      return
    where = ", ".join(f"{n}={float(info.metrics[n])}" for n in bad)
    if self.policy == "stop":
      raise NonFiniteError(
        f"step {info.step}: non-finite {where}; the update was not applied "
        f"and the run stopped (nan_policy=stop); last checkpoint: step "
        f"{self.last_checkpoint()}"
      )
    self.skipped += 1
    logger.warning(
      "step %d: non-finite %s; update skipped (%d so far)", info.step, where, self.skipped
    )

  def report(self) -> dict[str, float]:
    return {"train/skipped_steps": float(self.skipped)}

  def check_share(self, step: int) -> None:
    """Raises SkippedUpdatesError when more than `max_share` of the `step` updates so far
    were skipped (what a finished run calls; a skipped update changed nothing)."""
    if step > 0 and self.skipped / step > self.max_share:
      raise SkippedUpdatesError(
        f"{self.skipped} of {step} updates were skipped for non-finite values "
        f"(nan_policy=skip), more than max_skipped_share={self.max_share:g}; the run ended at "
        f"step {step} (last checkpoint: step {self.last_checkpoint()}); lower the learning "
        "rate or check the data, or raise --config.max_skipped_share to accept it"
      )


class Throughput:
  """Step time, tokens/s, TFLOP/s per device and MFU over the steps since the last report.

  The run's first step compiles: it is reported once on its own (`perf/first_step_s`) and
  kept out of the averages. `flops_fn(batch)` gives a step's model FLOPs over all processes.
  """

  def __init__(
    self,
    flops_fn: Callable[[Mapping[str, np.ndarray]], float],
    n_devices: int,
    peak_flops: float | None,
  ):
    self.flops_fn, self.n_devices, self.peak = flops_fn, n_devices, peak_flops
    self.first_step_s: float | None = None
    self._reset()

  def _reset(self) -> None:
    self.seconds = self.tokens = self.flops = 0.0
    self.steps = 0

  def __call__(self, info: StepInfo) -> None:
    if info.first:
      self.first_step_s = info.seconds
      return
    self.seconds += info.seconds
    self.tokens += float(info.metrics.get("tokens", 0.0))  # global already
    self.flops += self.flops_fn(info.batch)
    self.steps += 1

  def report(self) -> dict[str, float]:
    """The window's figures (then a new window starts)."""
    out = {}
    if self.steps:
      seconds = max(self.seconds, 1e-9)
      per_device = self.flops / seconds / self.n_devices
      out = {
        "perf/step_time_s": seconds / self.steps,
        "perf/tokens_per_s": self.tokens / seconds,
        "perf/tflops_per_s_per_device": per_device / 1e12,
      }
      if self.peak:
        out["perf/mfu"] = per_device / self.peak
    if self.first_step_s is not None:
      out["perf/first_step_s"] = self.first_step_s
      self.first_step_s = None
    self._reset()
    return out


# Seconds between redraws when stderr is not a terminal (a log file, a notebook's saved output):
# each redraw there is kept, so a 300-step run would leave 300 of them.
QUIET_REFRESH_S = 2.0


class ProgressBar:
  """A tqdm bar over the run's steps showing the loss and the learning rate."""

  def __init__(self, total: int, start: int, desc: str):
    interactive = sys.stderr.isatty()
    self.bar = tqdm(
      total=total,
      initial=start,
      desc=desc,
      unit="step",
      dynamic_ncols=True,
      mininterval=0.1 if interactive else QUIET_REFRESH_S,
    )

  def __call__(self, info: StepInfo) -> None:
    self.bar.update(1)
    self.bar.set_postfix(
      loss=f"{info.metrics['loss']:.4f}", lr=f"{info.metrics['learning_rate']:.2e}", refresh=False
    )

  def close(self) -> None:
    self.bar.close()


def train_record(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The step's metrics as `train/...` scalars; an objective's own sums pass through."""
  m = {k: float(v) for k, v in metrics.items()}
  for key in ("nonfinite_loss", "nonfinite_grad_norm"):
    m.pop(key, None)
  record = {
    "train/loss": m.pop("loss"),
    "train/grad_norm": m.pop("grad_norm"),
    "train/learning_rate": m.pop("learning_rate"),
  }
  if "correct_tokens" in m and "supervised_tokens" in m:
    record["train/token_accuracy"] = m.pop("correct_tokens") / max(m["supervised_tokens"], 1.0)
  record.update({f"train/{k}": v for k, v in m.items()})
  return record


def memory_stats() -> dict[str, float]:
  """Peak device memory of the first local device, where its allocator reports one."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" not in stats:
    return {}
  return {"perf/peak_memory_gb": stats["peak_bytes_in_use"] / 2**30}


class LogMetrics:
  """Writes one record: the step's `train/...` metrics and what each source reports."""

  def __init__(self, writer: MetricWriter, sources: Sequence[Callable[[], Mapping]] = ()):
    self.writer, self.sources = writer, list(sources)

  def __call__(self, info: StepInfo) -> None:
    record = train_record(info.metrics)
    for source in self.sources:
      record.update(source())
    self.writer.write(info.step, record)


class Evaluator(Protocol):
  """Metrics of the model in `state`, e.g. {"eval/loss": ...} (neo_jax/evals/evaluators.py)."""

  def __call__(self, state: TrainState, step: int) -> dict[str, float]: ...


class Evaluate:
  """Runs evaluators and writes their metrics as one record."""

  def __init__(self, evaluators: Sequence[Evaluator], writer: MetricWriter):
    self.evaluators, self.writer = list(evaluators), writer

  def __call__(self, info: StepInfo) -> None:
    t0 = time.perf_counter()
    record = {}
    for evaluate in self.evaluators:
      record.update(evaluate(info.state, info.step))
    self.writer.write(info.step, record)
    logger.info(
      "step %d (evaluated in %.1f s): %s",
      info.step,
      time.perf_counter() - t0,
      ", ".join(f"{k}={v:.4f}" for k, v in record.items()),
    )


class SaveCheckpoint:
  """Saves the state and the data position (async); the meta records stage, time, loss and
  what `meta_fn` adds (counters a resumed run continues from, e.g. skipped_steps)."""

  def __init__(
    self, checkpointer: RunCheckpointer, stage: str, meta_fn: Callable[[], Mapping[str, Any]] = dict
  ):
    self.checkpointer, self.stage, self.meta_fn = checkpointer, stage, meta_fn

  def __call__(self, info: StepInfo) -> None:
    self.checkpointer.save(
      info.state,
      info.data_state,
      meta={
        "stage": self.stage,
        "time": time.time(),
        "loss": float(info.metrics["loss"]),
        **self.meta_fn(),
      },
    )
