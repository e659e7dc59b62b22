"""Training-run checkpoints (orbax) and where a stage's parameters come from.

A run directory (WORKDIR) holds:

    config.json                HF NEO config of the model (architecture; like an HF / neo-jax dir)
    train_config.json          the resolved training config
    tokenizer.json, ...        the HF tokenizer files the data was encoded with (grain data)
    checkpoints/<step>/
        params/                the parameter tree (orbax StandardSave): what a next stage,
                               `load_checkpoint(WORKDIR)` and `neo-jax generate` read
        train_state/           {step, opt_state, rng} (+ objective_state when there is one)
        data/                  the data iterator's state (grain: one JSON file per process)
        meta/                  JSON: step, stage, time, last metrics
    metrics.jsonl, tensorboard/

Saving is asynchronous (orbax writes in a background thread while training continues) and
keeps the newest `max_to_keep` steps. Restoring places every array directly on its sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from neo_jax.config import NeoConfig
from neo_jax.errors import UserError
from neo_jax.model import abstract_params
from neo_jax.train.run_dir import (CHECKPOINT_DIR, MODEL_CONFIG_FILE, TRAIN_CONFIG_FILE,
                                   is_run_dir)
from neo_jax.train.state import TrainState

logger = logging.getLogger("neo_jax.train")


# NeoConfig fields that say how to compute, not what the model is
COMPUTE_FIELDS = ("dtype", "param_dtype", "attention_impl", "attention_q_chunk", "remat_policy")


@functools.cache
def _iterator_state_type() -> type:
  """grain.DatasetIterator holding a saved state (grain is imported only when data is saved,
  so reading parameters works where grain is not installed)."""
  import grain

  class IteratorState(grain.DatasetIterator):
    """A data iterator's state captured at one step, saved by grain's orbax handler.

    grain writes one JSON file per process, so multi-process runs keep each process's
    position. The trainer snapshots the state right after taking a step's batch, so a batch
    fetched ahead (while the device computes) is never counted as consumed.
    """

    def __init__(self, state: Optional[dict] = None):
      super().__init__()
      self.state = state

    def __next__(self):
      raise StopIteration

    def get_state(self) -> dict:
      return self.state

    def set_state(self, state: dict) -> None:
      self.state = state

  return IteratorState


class RunCheckpointer:
  """Saves and restores TrainState + data-iterator state under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, *, max_to_keep: Optional[int] = 3,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    # reading: neither create nor delete anything (orbax's read_only mode only adds warnings)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, create=not read_only,
        enable_async_checkpointing=async_save and not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state: TrainState, data_state: Optional[dict] = None,
           meta: Optional[Mapping[str, Any]] = None) -> bool:
    """Starts saving at `state.step` (returns before the write finishes when async).

    `data_state` is the data iterator's `get_state()` after the batch of this step.
    """
    step = int(jax.device_get(state.step))
    if step in self.all_steps():
      return False
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    if state.objective_state is not None:
      train["objective_state"] = state.objective_state
    items = {
        "params": ocp.args.StandardSave(state.params),
        "train_state": ocp.args.StandardSave(train),
        "meta": ocp.args.JsonSave(_jsonable(dict(meta or {}, step=step))),
    }
    if data_state is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(_iterator_state_type()(
          _jsonable(data_state)))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract: TrainState, step: Optional[int] = None,
              data_iterator: Any = None) -> tuple[TrainState, dict]:
    """TrainState (on the shardings of `abstract`) and meta; sets the iterator's state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{self.directory}: no checkpoint to restore")
    train_abs = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
    if abstract.objective_state is not None:
      train_abs["objective_state"] = abstract.objective_state
    items = {"params": ocp.args.StandardRestore(abstract.params),
             "train_state": ocp.args.StandardRestore(train_abs),
             "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      if not os.path.isdir(os.path.join(self.directory, str(step), "data")):
        raise UserError(f"{self.directory}/{step}: the checkpoint holds no data-iterator state")
      import grain
      items["data"] = grain.checkpoint.CheckpointRestore(_iterator_state_type()())
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      data_iterator.set_state(restored["data"].state)
    ts = restored["train_state"]
    state = TrainState(step=ts["step"], params=restored["params"], opt_state=ts["opt_state"],
                       rng=ts["rng"], objective_state=ts.get("objective_state"))
    return state, dict(restored["meta"])

  def restore_params(self, abstract_params_tree: Any, step: Optional[int] = None) -> Any:
    """Only the parameter tree (for the next stage or for inference)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{self.directory}: no checkpoint to read parameters from")
    restored = self.manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params_tree)))
    return restored["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)) or isinstance(x, jax.Array):
    return np.asarray(x).tolist()
  if isinstance(x, bytes):
    return x.decode("latin-1")
  return x


# --- run directories as checkpoints ---------------------------------------------------------

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
    raise UserError(f"{path}: not a training run directory (expected {MODEL_CONFIG_FILE}, "
                    f"{TRAIN_CONFIG_FILE} and {CHECKPOINT_DIR}/)")
  config = run_model_config(path, **compute)
  ckpt = RunCheckpointer(path, max_to_keep=None, async_save=False, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise UserError(f"{path}: the run has no checkpoint yet")
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, abstract_params(config))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(config), shardings)
    params = ckpt.restore_params(target, step)
  finally:
    ckpt.close()
  return params, config


# --- where a stage starts ---------------------------------------------------------------------

def reconcile(arch_from: NeoConfig, compute_from: NeoConfig) -> NeoConfig:
  """Architecture of a loaded checkpoint with the computation fields of the training config;
  architecture fields that differ from the training config are logged."""
  compute = {k: getattr(compute_from, k) for k in COMPUTE_FIELDS}
  differ = [f.name for f in dataclasses.fields(NeoConfig)
            if f.name not in COMPUTE_FIELDS
            and getattr(arch_from, f.name) != getattr(compute_from, f.name)]
  if differ:
    logger.warning("the initial checkpoint's architecture differs from config.model in %s; "
                   "using the checkpoint's", ", ".join(differ))
  return arch_from.replace(**compute)


def load_initial_params(path: str, fmt: str, model_config: NeoConfig, *, seed: int = 0,
                        step: Optional[int] = None) -> tuple[Any, NeoConfig]:
  """(host params, NeoConfig) a stage starts from.

  fmt "run": a neo-jax training run directory (params of its newest checkpoint, or `step`);
  "neo": any NEO checkpoint `neo_jax.convert.load_checkpoint` reads (HF NEO directory, neo-jax
  params directory, training run); "qwen3": an HF Qwen3 directory, initialised as NEO (spec
  5.4) with config.model.num_prebuffer_layers pre-Buffer layers.
  """
  compute = {k: getattr(model_config, k) for k in COMPUTE_FIELDS}
  if fmt == "run" or (fmt == "neo" and is_run_dir(path)):
    params, loaded = load_run_params(path, step=step, **compute)
  elif fmt == "neo":
    from neo_jax.convert import load_checkpoint
    params, loaded = load_checkpoint(path, **compute)
  elif fmt == "qwen3":
    from neo_jax.convert import qwen3_to_neo
    extra = {k: getattr(model_config, k) for k in ("vision_hidden_size", "rope_theta_vision",
                                                   "rope_theta_hw", "min_pixels", "max_pixels")}
    params, loaded = qwen3_to_neo(path, model_config.num_prebuffer_layers, seed=seed,
                                  dtype=model_config.param_dtype, **extra)
  else:
    raise UserError(f"init.format={fmt!r} is not one of 'run', 'neo', 'qwen3'")
  return jax.device_get(params), reconcile(loaded, model_config)
