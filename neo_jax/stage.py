"""A training stage from its config: the Trainer with the objective and evaluators it names.

    result = train(config)                       what `neo-jax train` runs
    trainer = build_trainer(config)              to add hooks before `trainer.run()`

The trainer core knows neither objectives nor evaluators by name; this is where the config's
`objective` (neo_jax/objectives/) and `eval` group (neo_jax/evals/evaluators.py) are looked
up and plugged in.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections

from neo_jax import objectives
from neo_jax.evals import evaluators
from neo_jax.trainer.hooks import Evaluate
from neo_jax.trainer.loop import Trainer, TrainResult


def build_trainer(
  config: ml_collections.ConfigDict, *, data_iterator: Iterator[dict] | None = None
) -> Trainer:
  """Trainer(config, the config's objective) with the config's evaluators as a hook."""
  trainer = Trainer(config, objectives.from_config(config), data_iterator=data_iterator)
  try:
    evals = evaluators.from_config(config, trainer)
  except BaseException:
    trainer.close()
    raise
  if evals:
    trainer.add_hook(Evaluate(evals, trainer.writer), config.eval.every_steps, last=True)
  return trainer


def train(
  config: ml_collections.ConfigDict, *, data_iterator: Iterator[dict] | None = None
) -> TrainResult:
  """Runs the stage `config` describes (resuming its run directory if it has a checkpoint)."""
  return build_trainer(config, data_iterator=data_iterator).run()
