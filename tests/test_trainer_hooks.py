"""Each hook of the trainer on its own, with hand-made StepInfos (no model, no trainer)."""

import json
import sys

import numpy as np
import pytest

from neo_jax.errors import RunError
from neo_jax.trainer import hooks
from neo_jax.trainer.hooks import (
  Cadence,
  Evaluate,
  LogMetrics,
  NanPolicy,
  NonFiniteError,
  ProgressBar,
  SaveCheckpoint,
  SkippedUpdatesError,
  StepInfo,
  Throughput,
  memory_stats,
  train_record,
)
from neo_jax.trainer.metrics import MetricWriter, read_jsonl


def info(step=1, *, first=False, last=False, seconds=0.5, batch=None, **metrics):
  base = {
    "loss": 2.0,
    "grad_norm": 1.0,
    "learning_rate": 1e-3,
    "nonfinite_loss": 0,
    "nonfinite_grad_norm": 0,
  }
  return StepInfo(
    step=step,
    state="STATE",
    metrics={**base, **metrics},
    batch=batch or {},
    data_state={"step": step},
    seconds=seconds,
    first=first,
    last=last,
  )


def test_cadence():
  every3 = Cadence(3)
  assert [s for s in range(1, 10) if every3.due(info(s))] == [3, 6, 9]
  assert Cadence(3, first=True).due(info(1, first=True))
  assert Cadence(0, last=True).due(info(7, last=True))
  assert not Cadence(0, first=True, last=True).due(info(4))
  assert not Cadence(5).due(info(4, last=True))


def test_nan_policy_stop_names_the_step_values_and_last_checkpoint():
  policy = NanPolicy("stop", last_checkpoint=lambda: 40)
  policy(info(41))  # finite: nothing happens
  with pytest.raises(NonFiniteError, match=r"step 42: non-finite loss=nan; .*checkpoint: step 40"):
    policy(info(42, loss=float("nan"), nonfinite_loss=1))


def test_nan_policy_skip_counts_and_reports():
  policy = NanPolicy("skip")
  policy(info(1, grad_norm=float("inf"), nonfinite_grad_norm=1))
  policy(info(2))
  policy(info(3, loss=float("nan"), nonfinite_loss=1))
  assert policy.report() == {"train/skipped_steps": 2.0}
  ignore = NanPolicy("ignore")
  ignore(info(1, loss=float("nan"), nonfinite_loss=1))
  assert ignore.report() == {"train/skipped_steps": 0.0}


def test_nan_policy_continues_a_resumed_count_and_fails_past_its_share():
  policy = NanPolicy("skip", last_checkpoint=lambda: 8, skipped=2, max_share=0.25)
  policy(info(9, loss=float("nan"), nonfinite_loss=1))
  assert policy.report() == {"train/skipped_steps": 3.0}
  policy.check_share(12)  # 3 of 12 = 0.25: at the limit, not over it
  with pytest.raises(
    SkippedUpdatesError,
    match=r"3 of 11 updates were skipped .* "
    r"max_skipped_share=0.25; the run ended at step 11 \(last checkpoint: "
    r"step 8\)",
  ):
    policy.check_share(11)
  assert issubclass(SkippedUpdatesError, RunError) and issubclass(NonFiniteError, RunError)


def test_throughput_window_excludes_the_compiling_step():
  meter = Throughput(lambda batch: 1e12, n_devices=2, peak_flops=2e12)
  meter(info(1, first=True, seconds=9.0, tokens=100.0))
  meter(info(2, seconds=1.0, tokens=100.0))
  meter(info(3, seconds=3.0, tokens=300.0))
  out = meter.report()
  assert out["perf/first_step_s"] == 9.0
  assert out["perf/step_time_s"] == pytest.approx(2.0)
  assert out["perf/tokens_per_s"] == pytest.approx(100.0)
  assert out["perf/tflops_per_s_per_device"] == pytest.approx(2e12 / 4.0 / 2 / 1e12)
  assert out["perf/mfu"] == pytest.approx(0.25 / 2.0)
  assert meter.report() == {}  # a new window; the first step is reported once
  no_peak = Throughput(lambda batch: 1.0, n_devices=1, peak_flops=None)
  no_peak(info(2))
  assert "perf/mfu" not in no_peak.report()


def test_progress_bar_redraws_rarely_where_every_redraw_is_kept(monkeypatch):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
  bar = ProgressBar(total=10, start=0, desc="x")
  assert bar.bar.mininterval == hooks.QUIET_REFRESH_S
  bar.close()
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
  bar = ProgressBar(total=10, start=0, desc="x")
  assert bar.bar.mininterval == 0.1
  bar.close()


def test_progress_bar_counts_from_the_start_step():
  bar = ProgressBar(total=10, start=4, desc="x")
  bar(info(5))
  bar(info(6, loss=0.25))
  assert bar.bar.n == 6 and "0.2500" in bar.bar.postfix
  bar.close()


def test_train_record_names_and_token_accuracy():
  record = train_record(
    {
      "loss": 1.5,
      "grad_norm": 2.0,
      "learning_rate": 0.1,
      "nonfinite_loss": 0,
      "nonfinite_grad_norm": 0,
      "correct_tokens": 3.0,
      "supervised_tokens": 4.0,
      "pairs": 2.0,
    }
  )
  assert record == {
    "train/loss": 1.5,
    "train/grad_norm": 2.0,
    "train/learning_rate": 0.1,
    "train/token_accuracy": 0.75,
    "train/supervised_tokens": 4.0,
    "train/pairs": 2.0,
  }


def test_log_metrics_writes_one_record_with_its_sources(tmp_path):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  hook = LogMetrics(writer, [lambda: {"perf/x": 1.0}, lambda: {"data/y": 2.0}])
  hook(info(3))
  writer.close()
  (record,) = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert record["step"] == 3 and record["train/loss"] == 2.0
  assert record["perf/x"] == 1.0 and record["data/y"] == 2.0
  assert writer.history == [record]


def test_evaluate_merges_evaluators_into_one_record(tmp_path):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  seen = []

  def loss(state, step):
    seen.append((state, step))
    return {"eval/loss": 0.5}

  Evaluate([loss, lambda state, step: {"vqa/accuracy": 0.75}], writer)(info(8, last=True))
  writer.close()
  assert seen == [("STATE", 8)]
  assert read_jsonl(str(tmp_path / "metrics.jsonl")) == [
    {"step": 8, "eval/loss": 0.5, "vqa/accuracy": 0.75}
  ]


def test_save_checkpoint_passes_state_data_position_and_meta():
  saved = []

  class Recorder:
    def save(self, state, data_state, meta):
      saved.append((state, data_state, meta))

  SaveCheckpoint(Recorder(), "sft", lambda: {"skipped_steps": 3})(info(5, loss=1.25))
  ((state, data_state, meta),) = saved
  assert state == "STATE" and data_state == {"step": 5}
  assert meta["stage"] == "sft" and meta["loss"] == 1.25 and meta["time"] > 0
  assert meta["skipped_steps"] == 3
  json.dumps(meta)


def test_memory_stats_is_a_dict_of_gigabytes():
  stats = memory_stats()
  assert set(stats) <= {"perf/peak_memory_gb"}
  assert all(np.isfinite(v) and v >= 0 for v in stats.values())
