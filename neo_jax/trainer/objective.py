"""What a step optimises: the interface through which objectives plug into the trainer.

The trainer core (state, step, loop, hooks, checkpoints) knows no objective by name. An
`Objective` gives it a loss over a batch and that loss's FLOPs; the implementations and the
one table that maps `config.objective` to them are neo_jax/objectives/.

A loss returns sums over its (micro-)batch, `LossOutput(loss_sum, weight_sum, metrics)`; the
step divides once over the whole batch, so accumulation and sharding do not change the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from neo_jax.config import NeoConfig


class LossOutput(NamedTuple):
  """Sums over a (micro-)batch; `metrics` holds further sums (counts) for logging."""

  loss_sum: jax.Array  # float32 scalar: sum of weight * loss
  weight_sum: jax.Array  # float32 scalar: the normaliser
  metrics: dict


Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch], LossOutput]
# an objective that carries state between steps (TrainState.objective_state): the state goes in
# and comes out of every micro-batch, in order
StatefulLossFn = Callable[[Any, Batch, Any], tuple[LossOutput, Any]]
# arrays an objective adds to each sharded batch before the step (e.g. reference log-probs)
BatchFn = Callable[[Batch], dict[str, jax.Array]]
# evaluation: (params, batch, objective state) -> sums; the state is read, never advanced
EvalLossFn = Callable[[Any, Batch, Any], LossOutput]


def eval_loss(loss_fn: LossFn | StatefulLossFn, stateful: bool) -> EvalLossFn:
  """The loss as evaluators call it, with the objective state training has reached (a
  stateful loss's updated state is dropped: evaluating does not move training's state)."""
  if stateful:
    return lambda params, batch, objective_state: loss_fn(params, batch, objective_state)[0]
  return lambda params, batch, objective_state=None: loss_fn(params, batch)


@dataclasses.dataclass(frozen=True)
class ObjectiveSetup:
  """What an objective's batch function may need, built by the trainer's set-up."""

  config: ml_collections.ConfigDict
  model_config: NeoConfig
  mesh: Any
  rules: tuple  # the logical-axis rules the trainer runs under
  param_shardings: Any
  params: Any  # the state's parameters (the starting ones, or the restored ones on resume)
  resuming: bool


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss over a batch, and its FLOPs for MFU.

    make_loss(model_config, config) -> LossFn (or StatefulLossFn with `init_state`)
    step_flops(model_config, host batch, trainable paths, config) -> model FLOPs of a step

  Optional parts, for objectives that need more than (params, batch):
    init_state     state carried from step to step in TrainState.objective_state (e.g. a
                   running mean); the loss then is (params, batch, state) -> (LossOutput, state)
    make_batch_fn  set-up -> a BatchFn run on each sharded batch before the step, or None
    summarize      the step's metric sums -> the values logged
  """

  name: str
  make_loss: Callable[[NeoConfig, ml_collections.ConfigDict], LossFn | StatefulLossFn]
  step_flops: Callable[[NeoConfig, Mapping[str, np.ndarray], set, ml_collections.ConfigDict], float]
  init_state: Callable[[NeoConfig, ml_collections.ConfigDict], Any] | None = None
  make_batch_fn: Callable[[ObjectiveSetup], BatchFn | None] | None = None
  summarize: Callable[[Mapping[str, Any]], dict] | None = None

  @property
  def stateful(self) -> bool:
    return self.init_state is not None
