"""Periodic evaluation hooks: held-out loss and VQA exact match.

A hook is any object with `name`, `every_steps` and `__call__(state, step) -> {metric: value}`;
the trainer calls it every `every_steps` updates (and after the last one) and logs what it
returns. VQA accuracy needs answers from greedy decoding; the hook takes the decoder as a
`generate_fn(params, examples) -> [answer text]`, so any generator (neo_jax.inference) fits.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from neo_jax.parallel.sharding import RULES, batch_shardings, replicated, shard_batch
from neo_jax.train.state import TrainState
from neo_jax.train.step import LossFn

GenerateFn = Callable[[Any, Sequence[Any]], Sequence[str]]


class EvalHook(Protocol):
  name: str
  every_steps: int

  def __call__(self, state: TrainState, step: int) -> dict[str, float]:
    ...


class HeldOutLoss:
  """Weighted loss and token accuracy of the model on fixed held-out batches."""

  def __init__(self, batches: Sequence[Mapping[str, np.ndarray]], loss_fn: LossFn, mesh: Mesh,
               param_shardings: Any, every_steps: int, name: str = "eval"):
    if not batches:
      raise ValueError("HeldOutLoss needs at least one batch")
    self.name, self.every_steps, self.mesh = name, every_steps, mesh
    self.batches = [dict(b) for b in batches]
    shardings = batch_shardings(self.batches[0], mesh)
    self._shardings = shardings
    self._fn = jax.jit(lambda p, b: loss_fn(p, b), in_shardings=(param_shardings, shardings),
                       out_shardings=replicated(mesh))

  def __call__(self, state: TrainState, step: int) -> dict[str, float]:
    loss = weight = correct = supervised = 0.0
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(RULES):
      for batch in self.batches:
        out = jax.device_get(self._fn(state.params, shard_batch(batch, self.mesh,
                                                                 self._shardings)))
        loss += float(out.loss_sum)
        weight += float(out.weight_sum)
        correct += float(out.metrics.get("correct_tokens", 0.0))
        supervised += float(out.metrics.get("supervised_tokens", 0.0))
    return {f"{self.name}/loss": loss / max(weight, 1e-12),
            f"{self.name}/token_accuracy": correct / max(supervised, 1.0)}


class VqaExactMatch:
  """Fraction of questions whose generated answer matches the reference.

  Matching is `neo_jax.inference.metrics.vqa_correct` (the normalisation `neo-jax eval` uses)
  unless `is_correct(prediction, reference)` is given.
  """

  def __init__(self, examples: Sequence[Any], generate_fn: GenerateFn, every_steps: int,
               name: str = "vqa", answer_of: Callable[[Any], str] = lambda e: e.answer,
               is_correct: Optional[Callable[[str, str], bool]] = None):
    self.name, self.every_steps = name, every_steps
    self.examples = list(examples)
    self.generate_fn = generate_fn
    self.answer_of = answer_of
    if is_correct is None:
      from neo_jax.inference.metrics import vqa_correct
      is_correct = lambda prediction, reference: vqa_correct(prediction, [reference])
    self.is_correct = is_correct

  def __call__(self, state: TrainState, step: int) -> dict[str, float]:
    answers = list(self.generate_fn(state.params, self.examples))
    if len(answers) != len(self.examples):
      raise ValueError(f"generate_fn returned {len(answers)} answers for "
                       f"{len(self.examples)} questions")
    hits = [self.is_correct(a, self.answer_of(e)) for a, e in zip(answers, self.examples)]
    return {f"{self.name}/accuracy": float(np.mean(hits)) if hits else 0.0,
            f"{self.name}/examples": float(len(hits))}
