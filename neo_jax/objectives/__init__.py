"""What a training step optimises, and the one place a config's `objective` is looked up.

    next_token   weighted next-token cross-entropy (pretrain, midtrain, SFT)   next_token.py
    preference   ACPO and the DPO family on packed preference pairs           preference/

Each is an `neo_jax.trainer.objective.Objective`; the trainer takes one and knows none by name.
A new objective is a module defining one, added to OBJECTIVES.
"""

from __future__ import annotations

import ml_collections

from neo_jax.objectives import next_token
from neo_jax.objectives.preference import objective as preference
from neo_jax.trainer.objective import Objective

OBJECTIVES: dict[str, Objective] = {
  "next_token": next_token.OBJECTIVE,
  "preference": preference.OBJECTIVE,
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"objective {name!r} is not one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def from_config(config: ml_collections.ConfigDict) -> Objective:
  """The objective `config.objective` names."""
  return get(config.objective)
