"""A trained run's exact match on easy-vqa's held-out test questions, per answer family.

    result = score_run("workdir/demo/sft", questions=1000)
    result["accuracy"], result["by_kind"]["shape"]["accuracy"], result["question_set"]

The questions are the first `questions` of the test split in a fixed order
(`neo_jax.data.pipeline.read_vqa_eval`); `question_set` names them (a digest of their ids), so
two results compare only when it is the same. `neo-jax demo` and `neo-jax compare-preference`
score every run this way.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import numpy as np

from neo_jax.data.embedded import VqaExample, answer_kind
from neo_jax.data.pipeline import read_vqa_eval
from neo_jax.evals.metrics import vqa_correct
from neo_jax.inference import load_for_inference, vqa_answer_fn
from neo_jax.trainer.metrics import MetricWriter

FAMILIES = ("color", "shape", "yes/no")


def question_set(examples: Sequence[VqaExample]) -> str:
  """A short name of exactly these questions, in this order."""
  digest = hashlib.sha256("\n".join(e.id for e in examples).encode()).hexdigest()[:12]
  return f"easy_vqa/test[:{len(examples)}]@{digest}"


def score_run(
  workdir: str,
  questions: int,
  *,
  batch_size: int = 32,
  examples: Sequence[VqaExample] | None = None,
) -> dict:
  """Greedy answers of the run's newest checkpoint to the first `questions` test questions
  (or to `examples`), its images preprocessed with the run's own pixel range."""
  t0 = time.perf_counter()
  model = load_for_inference(workdir)
  examples = list(examples) if examples is not None else read_vqa_eval("test", questions)
  answer = vqa_answer_fn(
    model.config,
    model.tokenizer,
    max_new_tokens=4,
    batch_size=min(batch_size, len(examples)),
    min_pixels=model.config.min_pixels,
    max_pixels=model.config.max_pixels,
  )
  predictions = answer(model.params, examples)
  hits = [vqa_correct(p, [e.answer]) for p, e in zip(predictions, examples)]
  by_kind: dict[str, list[bool]] = {}
  for hit, example in zip(hits, examples):
    by_kind.setdefault(answer_kind(example.answer), []).append(hit)
  return {
    "accuracy": float(np.mean(hits)),
    "questions": len(hits),
    "question_set": question_set(examples),
    "by_kind": {
      k: {"accuracy": float(np.mean(v)), "questions": len(v)} for k, v in sorted(by_kind.items())
    },
    "seconds": round(time.perf_counter() - t0, 1),
    "examples": [
      {"question": e.question, "answer": e.answer, "prediction": p}
      for e, p in list(zip(examples, predictions))[:5]
    ],
  }


def format_accuracy(stage: str, result: dict) -> str:
  kinds = ", ".join(
    f"{k} {v['accuracy']:.1%} of {v['questions']}" for k, v in result["by_kind"].items()
  )
  return (
    f"VQA accuracy after {stage}: {result['accuracy']:.1%} exact match on "
    f"{result['questions']} easy-vqa test questions ({kinds})"
  )


def log_score(workdir: str, step: int, result: dict) -> None:
  """The accuracy into the run's metrics.jsonl and TensorBoard (`vqa/accuracy`,
  `vqa/examples`), at `step`."""
  writer = MetricWriter(workdir)
  writer.write(step, {"vqa/accuracy": result["accuracy"], "vqa/examples": result["questions"]})
  writer.close()
