"""Saving and restoring a training run's steps (orbax), and where a stage's parameters come from.

The run directory's layout is neo_jax/run_dir.py. Saving is asynchronous (orbax writes in a
background thread while training continues) and keeps the newest `max_to_keep` steps.
Restoring places every array directly on its sharding, from the newest step that reads back
whole: a damaged newer step is named in one warning, moved to WORKDIR/damaged_checkpoints/
(never deleted) and the run resumes from the step before it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from neo_jax import run_dir
from neo_jax.config import NeoConfig
from neo_jax.convert import load_checkpoint, qwen3_to_neo
from neo_jax.errors import UserError
from neo_jax.trainer.state import TrainState

logger = logging.getLogger("neo_jax.train")


# NeoConfig fields that say how to compute, not what the model is
COMPUTE_FIELDS = (
  "dtype",
  "param_dtype",
  "attention_impl",
  "attention_q_chunk",
  "platform",
  "remat_policy",
)
# ... and how its images are preprocessed: the training config's pixel range is the one the
# data is made with, so it wins over an initial checkpoint's (the next stage's may be larger)
IMAGE_FIELDS = ("min_pixels", "max_pixels")


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

    def __init__(self, state: dict | None = None):
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

  def __init__(
    self,
    workdir: str,
    *,
    max_to_keep: int | None = 3,
    async_save: bool = True,
    read_only: bool = False,
  ):
    self.workdir, self.read_only = os.fspath(run_dir.path(workdir)), read_only
    self.directory = os.fspath(run_dir.path(workdir, run_dir.CHECKPOINT_DIR))
    self.manager = run_dir.checkpoint_manager(
      workdir, max_to_keep=max_to_keep, async_save=async_save, read_only=read_only
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(
    self, state: TrainState, data_state: dict | None = None, meta: Mapping[str, Any] | None = None
  ) -> bool:
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

      items["data"] = grain.checkpoint.CheckpointSave(_iterator_state_type()(_jsonable(data_state)))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(
    self, abstract: TrainState, step: int | None = None, data_iterator: Any = None
  ) -> tuple[TrainState, dict]:
    """TrainState (on the shardings of `abstract`) and meta of `step`, or of the newest step
    that reads back whole (a writable checkpointer moves the damaged newer ones to
    WORKDIR/damaged_checkpoints/); sets the iterator's state."""
    train_abs = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
    if abstract.objective_state is not None:
      train_abs["objective_state"] = abstract.objective_state

    def attempt(s: int) -> dict:
      items = {
        "params": ocp.args.StandardRestore(abstract.params),
        "train_state": ocp.args.StandardRestore(train_abs),
        "meta": ocp.args.JsonRestore(),
      }
      if data_iterator is not None:
        import grain

        items["data"] = grain.checkpoint.CheckpointRestore(_iterator_state_type()())
      for name in items:  # every folder there before reading any
        if not run_dir.path(self.directory, str(s), name).is_dir():
          raise run_dir.UnreadableStep(self.directory, s, f"{name}/ is missing")
      return {
        name: run_dir.read_step(
          self.directory, s, name, functools.partial(self._read_item, s, name, args)
        )
        for name, args in items.items()
      }

    saved = self.all_steps()
    if step is not None:
      if step not in saved:
        raise UserError(f"{self.directory}: no checkpoint step {step} (saved: {saved})")
      try:
        restored = attempt(step)
      except run_dir.UnreadableStep as e:
        raise UserError(f"{e}; restore another step (saved: {saved})") from None
    else:
      step, restored, damaged = run_dir.read_newest(self.directory, saved, attempt)
      if damaged and not self.read_only:
        self._set_aside(sorted(damaged))
    if data_iterator is not None:
      data_iterator.set_state(restored["data"].state)
    ts = restored["train_state"]
    state = TrainState(
      step=ts["step"],
      params=restored["params"],
      opt_state=ts["opt_state"],
      rng=ts["rng"],
      objective_state=ts.get("objective_state"),
    )
    return state, dict(restored["meta"], step=step)

  def _read_item(self, step: int, name: str, args: Any) -> Any:
    """One item on its own, so that a failure names the item it is in."""
    return self.manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps out of the manager's way (process 0; every process waits for it and
    re-reads the step list), so that the resumed run can save those steps again."""
    if jax.process_index() == 0:
      for where in run_dir.set_aside(self.workdir, steps):
        logger.warning("moved the damaged checkpoint to %s", where)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("neo_jax_set_aside_damaged_steps")
    self.manager.reload()

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


# --- where a stage starts ---------------------------------------------------------------------


def reconcile(arch_from: NeoConfig, compute_from: NeoConfig) -> NeoConfig:
  """Architecture of a loaded checkpoint with the computation and image fields of the training
  config; architecture fields that differ from the training config are logged."""
  decided = COMPUTE_FIELDS + IMAGE_FIELDS
  compute = {k: getattr(compute_from, k) for k in decided}
  differ = [
    f.name
    for f in dataclasses.fields(NeoConfig)
    if f.name not in decided and getattr(arch_from, f.name) != getattr(compute_from, f.name)
  ]
  if differ:
    logger.warning(
      "the initial checkpoint's architecture differs from config.model in %s; "
      "using the checkpoint's",
      ", ".join(differ),
    )
  return arch_from.replace(**compute)


def load_initial_params(
  path: str,
  fmt: str,
  model_config: NeoConfig,
  *,
  seed: int = 0,
  step: int | None = None,
  shardings: Callable[[NeoConfig], Any] | None = None,
) -> tuple[Any, NeoConfig]:
  """(params, NeoConfig) a stage starts from: host arrays, or with `shardings(config)` (the
  parameter shardings of the checkpoint's model) jax arrays on them, each process reading only
  the parts its devices hold (orbax restores to those shardings; safetensors are read a slice
  of a tensor at a time).

  fmt "run": a neo-jax training run directory (params of its newest checkpoint, or `step`);
  "neo": any NEO checkpoint `neo_jax.convert.load_checkpoint` reads (HF NEO directory, neo-jax
  params directory, training run); "qwen3": an HF Qwen3 directory, initialised as NEO
  (docs/reference/neo.md#initialisation-from-qwen3) with config.model.num_prebuffer_layers
  pre-Buffer layers.
  """
  compute = {k: getattr(model_config, k) for k in COMPUTE_FIELDS}
  if fmt == "run" or (fmt == "neo" and run_dir.is_run_dir(path)):
    params, loaded = run_dir.load_run_params(path, shardings, step=step, **compute)
  elif fmt == "neo":
    params, loaded = load_checkpoint(path, shardings, **compute)
  elif fmt == "qwen3":
    extra = {
      k: getattr(model_config, k)
      for k in (
        "vision_hidden_size",
        "rope_theta_vision",
        "rope_theta_hw",
        "min_pixels",
        "max_pixels",
      )
    }
    params, loaded = qwen3_to_neo(
      path,
      model_config.num_prebuffer_layers,
      seed=seed,
      dtype=model_config.param_dtype,
      shardings=shardings,
      **extra,
    )
  else:
    raise UserError(f"init.format={fmt!r} is not one of 'run', 'neo', 'qwen3'")
  if shardings is None:
    params = jax.device_get(params)
  return params, reconcile(loaded, model_config)
