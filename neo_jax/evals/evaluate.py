"""The evaluation loop: prepare prompts, answer them in batches, score, record each sample.

A predictor has two steps so that bad images are found (and counted) before batching, and so
that tests can plug in a predictor with known answers:

    prepare(example) -> prompt      raises ImageError for an unusable image
    answer(prompts) -> [text]       one answer per prompt, in order

`ModelPredictor` is the real one: NEO's evaluation prompt and greedy decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from neo_jax.config import NeoConfig
from neo_jax.data.image import ImageError
from neo_jax.data.inputs import prepare_generation_inputs
from neo_jax.evals.examples import EvalExample, SkipLog
from neo_jax.evals.metrics import (
  normalize_vqa_answer,
  pope_metrics,
  vqa_correct,
  vqa_metrics,
  yes_no,
)
from neo_jax.inference.generation import decode_text, generate


class Predictor(Protocol):
  def prepare(self, example: EvalExample) -> Any: ...

  def answer(self, prompts: Sequence[Any]) -> list[str]: ...


class ModelPredictor:
  """Greedy answers of a NEO model; every batch is padded to `batch_size` rows (one compile)."""

  def __init__(
    self,
    params: Any,
    config: NeoConfig,
    tokenizer: Any,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    system: str = "",
  ):
    self.params, self.config, self.tokenizer = params, config, tokenizer
    self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
    self.min_pixels, self.max_pixels, self.system = min_pixels, max_pixels, system

  def prepare(self, example: EvalExample) -> Any:
    return prepare_generation_inputs(
      self.tokenizer,
      self.config,
      example.question,
      [example.image],
      system=self.system,
      min_pixels=self.min_pixels,
      max_pixels=self.max_pixels,
    )

  def answer(self, prompts: Sequence[Any]) -> list[str]:
    out = generate(
      self.params, self.config, list(prompts), self.max_new_tokens, batch_size=self.batch_size
    )
    stops = (self.config.eos_token_id,)
    return [decode_text(self.tokenizer, ids, stops) for ids in out.token_lists()]


def score(task: str, example: EvalExample, prediction: str) -> dict:
  """The per-sample record: inputs, raw prediction, how it was read, whether it is right."""
  record = {
    "index": example.index,
    "image": example.image_name,
    "question": example.question,
    **example.extra,
    "prediction": prediction,
  }
  if task == "vqa":
    record["answer"] = example.answers[0] if len(example.answers) == 1 else list(example.answers)
    record["normalized_prediction"] = normalize_vqa_answer(prediction)
    record["correct"] = vqa_correct(prediction, example.answers)
  else:
    label = yes_no(prediction)
    record["label"] = example.answers[0]
    record["pred_label"] = label
    record["correct"] = label == example.answers[0]
  return record


def metrics_of(task: str, records: Sequence[dict]) -> dict:
  if task == "vqa":
    return vqa_metrics(r["correct"] for r in records)
  return pope_metrics([r["pred_label"] for r in records], [r["label"] for r in records])


@dataclasses.dataclass
class EvalResult:
  records: list[dict]
  metrics: dict


def evaluate(
  examples: Sequence[EvalExample],
  predictor: Predictor,
  task: str,
  *,
  batch_size: int = 8,
  skips: SkipLog | None = None,
  progress: bool = True,
  on_record: Callable[[dict], None] | None = None,
) -> EvalResult:
  """Answers every example (bad images skipped into `skips`) and computes the task's metrics.

  The metrics hold the task's numbers, `skipped` (count per reason, file lines included when
  `skips` came from the reader) and `skipped_total`.
  """
  from tqdm.auto import tqdm

  skips = skips if skips is not None else SkipLog()
  records: list[dict] = []
  pending: list[tuple[EvalExample, Any]] = []

  def flush():
    answers = predictor.answer([p for _, p in pending])
    if len(answers) != len(pending):
      raise RuntimeError(f"predictor gave {len(answers)} answers for {len(pending)} prompts")
    for (ex, _), text in zip(pending, answers):
      record = score(task, ex, text)
      records.append(record)
      if on_record is not None:
        on_record(record)
    bar.update(len(pending))
    pending.clear()

  with tqdm(total=len(examples), desc=f"eval {task}", unit="q", disable=not progress) as bar:
    for ex in examples:
      try:
        pending.append((ex, predictor.prepare(ex)))
      except ImageError as e:
        skips.skip("bad_image", f"example {ex.index} ({ex.image_name}): {e}")
        bar.update(1)
        continue
      if len(pending) == batch_size:
        flush()
    if pending:
      flush()
  metrics = {
    "task": task,
    **metrics_of(task, records),
    "skipped": dict(skips.counts),
    "skipped_total": skips.total,
  }
  return EvalResult(records, metrics)
