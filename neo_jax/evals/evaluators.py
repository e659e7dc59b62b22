"""The evaluators of a training run: held-out loss and VQA exact match, built from config.eval.

An evaluator is `evaluator(state, step) -> {metric: value}`; `from_config` builds the ones a
config asks for, and the caller hands them to the trainer's `Evaluate` hook at the config's
cadence (neo_jax/stage.py). VQA accuracy needs answers from greedy decoding; the evaluator
takes the decoder as a `generate_fn(params, examples) -> [answer text]`, so any generator fits
(by default neo_jax.inference's, with the real tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from neo_jax.data.embedded import load_named_tokenizer
from neo_jax.data.pipeline import read_vqa_eval
from neo_jax.evals.metrics import vqa_correct
from neo_jax.inference import vqa_answer_fn
from neo_jax.parallel.sharding import (
  RULES,
  batch_shardings,
  local_rows,
  mesh_context,
  replicated,
  shard_batch,
)
from neo_jax.trainer import batches
from neo_jax.trainer.hooks import Evaluator
from neo_jax.trainer.loop import Trainer
from neo_jax.trainer.objective import EvalLossFn
from neo_jax.trainer.state import TrainState

GenerateFn = Callable[[Any, Sequence[Any]], Sequence[str]]


class HeldOutLoss:
  """Weighted loss and token accuracy of the model on fixed held-out batches.

  `loss_fn(params, batch, objective_state)` gets the state's objective state (e.g. the BCO
  reward shift training has reached; None for stateless objectives)."""

  def __init__(
    self,
    batches: Sequence[Mapping[str, np.ndarray]],
    loss_fn: EvalLossFn,
    mesh: Mesh,
    param_shardings: Any,
    name: str = "eval",
    rules: Sequence = RULES,
  ):
    if not batches:
      raise ValueError("HeldOutLoss needs at least one batch")
    self.name, self.mesh, self.rules = name, mesh, tuple(rules)
    self.batches = [dict(b) for b in batches]
    self._shardings = batch_shardings(self.batches[0], mesh)
    self._fn = jax.jit(
      lambda p, o, b: loss_fn(p, b, o),
      in_shardings=(param_shardings, replicated(mesh), self._shardings),
      out_shardings=replicated(mesh),
    )

  def __call__(self, state: TrainState, step: int) -> dict[str, float]:
    loss = weight = correct = supervised = 0.0
    with mesh_context(self.mesh, self.rules):
      for batch in self.batches:
        out = jax.device_get(
          self._fn(
            state.params, state.objective_state, shard_batch(batch, self.mesh, self._shardings)
          )
        )
        loss += float(out.loss_sum)
        weight += float(out.weight_sum)
        correct += float(out.metrics.get("correct_tokens", 0.0))
        supervised += float(out.metrics.get("supervised_tokens", 0.0))
    return {
      f"{self.name}/loss": loss / max(weight, 1e-12),
      f"{self.name}/token_accuracy": correct / max(supervised, 1.0),
    }


class VqaExactMatch:
  """Fraction of questions whose generated answer matches the reference.

  Matching is `neo_jax.evals.metrics.vqa_correct` (the normalisation `neo-jax eval` uses)
  unless `is_correct(prediction, reference)` is given.
  """

  def __init__(
    self,
    examples: Sequence[Any],
    generate_fn: GenerateFn,
    name: str = "vqa",
    answer_of: Callable[[Any], str] = lambda e: e.answer,
    is_correct: Callable[[str, str], bool] | None = None,
  ):
    self.name = name
    self.examples = list(examples)
    self.generate_fn = generate_fn
    self.answer_of = answer_of
    self.is_correct = is_correct or (
      lambda prediction, reference: vqa_correct(prediction, [reference])
    )

  def __call__(self, state: TrainState, step: int) -> dict[str, float]:
    answers = list(self.generate_fn(state.params, self.examples))
    if len(answers) != len(self.examples):
      raise ValueError(
        f"generate_fn returned {len(answers)} answers for {len(self.examples)} questions"
      )
    hits = [self.is_correct(a, self.answer_of(e)) for a, e in zip(answers, self.examples)]
    return {
      f"{self.name}/accuracy": float(np.mean(hits)) if hits else 0.0,
      f"{self.name}/examples": float(len(hits)),
    }


def heldout_batches(config: ml_collections.ConfigDict, trainer: Trainer) -> list[dict]:
  """`eval.heldout_batches` batches of `eval.split` (of `eval.sources` when set), with the
  objective's per-batch arrays (e.g. reference log-probs) added once: they are fixed."""
  changes = {"sources": tuple(config.eval.sources)} if config.eval.sources else {}
  held = batches.make_iterator(
    config,
    trainer.model_config,
    split=config.eval.split,
    layout=getattr(trainer, "layout", None),
    **changes,
  )
  out = [next(held) for _ in range(config.eval.heldout_batches)]
  if trainer.batch_fn is not None:
    out = [
      {
        **b,
        **{
          k: local_rows(v, trainer.mesh)
          for k, v in trainer.batch_fn(shard_batch(b, trainer.mesh)).items()
        },
      }
      for b in out
    ]
  return out


def from_config(config: ml_collections.ConfigDict, trainer: Trainer) -> list[Evaluator]:
  """The evaluators `config.eval` asks for (none when eval.every_steps <= 0)."""
  e = config.eval
  if e.every_steps <= 0:
    return []
  evaluators = []
  if e.heldout_batches > 0:
    evaluators.append(
      HeldOutLoss(
        heldout_batches(config, trainer),
        trainer.eval_loss_fn,
        trainer.mesh,
        trainer.param_shardings,
        rules=trainer.rules,
      )
    )
  if e.vqa_examples > 0:
    mc = trainer.model_config
    generate_fn = vqa_answer_fn(
      mc,
      load_named_tokenizer(config.data.tokenizer),
      max_new_tokens=e.max_new_tokens,
      min_pixels=mc.min_pixels,
      max_pixels=mc.max_pixels,
    )
    evaluators.append(VqaExactMatch(read_vqa_eval("test", e.vqa_examples), generate_fn))
  return evaluators
