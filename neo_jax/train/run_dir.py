"""Training run directories as checkpoints for every command that loads one.

Light on purpose (no jax / orbax import): `neo_jax.convert.loading` registers this kind when
it is imported, so `neo-jax generate|eval|compare-logits|convert --checkpoint WORKDIR` read
the newest checkpoint of a training run. The loading itself lives in neo_jax.train.checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

RUN_KIND = "neo-jax training run"
CHECKPOINT_DIR = "checkpoints"
MODEL_CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"


def is_run_dir(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))
          and os.path.isfile(os.path.join(path, TRAIN_CONFIG_FILE))
          and os.path.isdir(os.path.join(path, CHECKPOINT_DIR)))


def load(path: str, shardings: Optional[Any] = None, **compute: Any):
  """(params, NeoConfig) of the run's newest checkpoint (see checkpoint.load_run_params)."""
  from neo_jax.train.checkpoint import load_run_params
  return load_run_params(path, shardings, **compute)


def register(register_kind: Callable[..., None]) -> None:
  """Adds the kind to a checkpoint registry (`neo_jax.convert.loading.register_kind`)."""
  register_kind(RUN_KIND, is_run_dir, load,
                f"{MODEL_CONFIG_FILE} + {TRAIN_CONFIG_FILE} + {CHECKPOINT_DIR}/<step>/",
                first=True)
