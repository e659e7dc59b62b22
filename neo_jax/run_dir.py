"""Training run directories: their layout, and reading a model back out of one.

A run directory (WORKDIR of `neo-jax train`) holds:

    config.json                HF NEO config of the model (architecture; like an HF / neo-jax dir)
    train_config.json          the resolved training config; its `model` is the model trained
    tokenizer.json, ...        the HF tokenizer files the data was encoded with (grain data)
    checkpoints/<step>/
        params/                the parameter tree (orbax StandardSave): what a next stage,
                               `load_checkpoint(WORKDIR)` and `neo-jax generate` read
        train_state/           {step, opt_state, rng} (+ objective_state when there is one)
        data/                  the data iterator's state (grain: one JSON file per process)
        meta/                  JSON: step, stage, time, last metrics
    reference/                 the frozen reference policy of a preference run
    metrics.jsonl, tensorboard/

Training writes it (neo_jax.trainer.checkpoint saves the steps); `neo_jax.convert` registers it
as a checkpoint kind, so `neo-jax generate|eval|compare-logits|convert --checkpoint WORKDIR`
read the newest checkpoint of a run. Both import this module; it imports neither.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from neo_jax.config import NeoConfig
from neo_jax.errors import UserError
from neo_jax.model import abstract_params

RUN_KIND = "neo-jax training run"
CHECKPOINT_DIR = "checkpoints"
MODEL_CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REFERENCE_DIR = "reference"
HOLDS = f"{MODEL_CONFIG_FILE} + {TRAIN_CONFIG_FILE} + {CHECKPOINT_DIR}/<step>/"


def is_run_dir(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))
          and os.path.isfile(os.path.join(path, TRAIN_CONFIG_FILE))
          and os.path.isdir(os.path.join(path, CHECKPOINT_DIR)))


def saved_steps(workdir: str) -> list[int]:
  """The steps with a checkpoint directory, oldest first (a listing: no orbax involved)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def checkpoint_manager(workdir: str, *, max_to_keep: Optional[int] = 3, async_save: bool = True,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of WORKDIR/checkpoints; `read_only` neither creates nor deletes anything
  (orbax's own read_only mode only adds warnings)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, create=not read_only,
      enable_async_checkpointing=async_save and not read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                               options=options)


def write_run_files(workdir: str, model_config: NeoConfig, train_config_json: str) -> None:
  """config.json (architecture, HF NEO form) and train_config.json (the whole recipe)."""
  os.makedirs(workdir, exist_ok=True)
  model_config.save_hf(workdir, torch_dtype=model_config.param_dtype)
  with open(os.path.join(workdir, TRAIN_CONFIG_FILE), "w") as f:
    f.write(train_config_json)


def run_model_config(workdir: str, **compute: Any) -> NeoConfig:
  """The NeoConfig a run trains: every field, from train_config.json's `model` section
  (config.json is the HF form for other tools; it does not carry every field)."""
  path = os.path.join(workdir, TRAIN_CONFIG_FILE)
  with open(path) as f:
    recipe = json.load(f)
  names = {f.name for f in dataclasses.fields(NeoConfig)}
  fields = {k: v for k, v in recipe.get("model", {}).items() if k in names}
  fields.update(compute)
  try:
    return NeoConfig(**fields)
  except (TypeError, ValueError) as e:
    raise UserError(f"{path}: bad model section ({e})") from None


def load_run_params(path: str, shardings: Optional[Any] = None, step: Optional[int] = None,
                    **compute: Any) -> tuple[dict, NeoConfig]:
  """(params, NeoConfig) of the newest (or `step`) checkpoint of a training run directory.

  Same contract as the loaders of `neo_jax.convert.load_checkpoint`: `compute` sets NeoConfig
  computation fields (`param_dtype` casts), `shardings` places the leaves (default: device 0).
  """
  path = os.path.abspath(os.fspath(path))
  if not is_run_dir(path):
    raise UserError(f"{path}: not a training run directory (expected {HOLDS})")
  config = run_model_config(path, **compute)
  manager = checkpoint_manager(path, async_save=False, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{path}: the run has no checkpoint yet")
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, abstract_params(config))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(config), shardings)
    restored = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  return restored["params"], config
