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

WORKDIR is a local path or a URL that etils.epath and orbax both write, e.g. gs://BUCKET/PATH
(gcsfs installed). Every file of the run goes through `path()`; orbax writes the steps to the
bucket itself and marks a finished step with a commit file (a local step is renamed into place
when finished), so a save cut short never leaves a step that `latest_step` would return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from typing import Any, Iterator, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

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


def is_remote(workdir: str | os.PathLike) -> bool:
  """A URL (gs://...) rather than a local path."""
  return "://" in os.fspath(workdir)


def path(workdir: str | os.PathLike, *parts: str) -> epath.Path:
  """WORKDIR/parts as an epath.Path: local paths absolute, URLs as they are."""
  text = os.fspath(workdir)
  return epath.Path(text if is_remote(text) else os.path.abspath(text)).joinpath(*parts)


def is_run_dir(workdir: str | os.PathLike) -> bool:
  return (path(workdir, MODEL_CONFIG_FILE).is_file()
          and path(workdir, TRAIN_CONFIG_FILE).is_file()
          and path(workdir, CHECKPOINT_DIR).is_dir())


def saved_steps(workdir: str) -> list[int]:
  """The steps with a checkpoint directory, oldest first (a listing: no orbax involved)."""
  directory = path(workdir, CHECKPOINT_DIR)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def checkpoint_manager(workdir: str, *, max_to_keep: Optional[int] = 3, async_save: bool = True,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of WORKDIR/checkpoints; `read_only` neither creates nor deletes anything
  (orbax's own read_only mode only adds warnings)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, create=not read_only,
      enable_async_checkpointing=async_save and not read_only)
  return ocp.CheckpointManager(path(workdir, CHECKPOINT_DIR), options=options)


@contextlib.contextmanager
def staged(workdir: str | os.PathLike) -> Iterator[str]:
  """A local directory whose files end up in WORKDIR: WORKDIR itself when it is local, else a
  temporary directory copied to the URL on exit (for writers that only know local files)."""
  if not is_remote(workdir):
    os.makedirs(workdir, exist_ok=True)
    yield os.fspath(workdir)
    return
  with tempfile.TemporaryDirectory() as local:
    yield local
    target = path(workdir)
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(local)):
      epath.Path(local, name).copy(target / name, overwrite=True)


class _Rewritten:
  """A text file opened for appending on storage that cannot append (object stores): the
  whole file is written again at every flush."""

  def __init__(self, target: epath.Path):
    self.target = target
    self.text = target.read_text() if target.exists() else ""

  def write(self, text: str) -> None:
    self.text += text

  def flush(self) -> None:
    self.target.write_text(self.text)

  def close(self) -> None:
    self.flush()


def open_append(workdir: str | os.PathLike, name: str):
  """WORKDIR/name opened for appending text (created with WORKDIR if missing)."""
  if not is_remote(workdir):
    os.makedirs(workdir, exist_ok=True)
    return open(os.path.join(workdir, name), "a")
  path(workdir).mkdir(parents=True, exist_ok=True)
  return _Rewritten(path(workdir, name))


def write_run_files(workdir: str, model_config: NeoConfig, train_config_json: str) -> None:
  """config.json (architecture, HF NEO form) and train_config.json (the whole recipe)."""
  with staged(workdir) as local:
    model_config.save_hf(local, torch_dtype=model_config.param_dtype)
    with open(os.path.join(local, TRAIN_CONFIG_FILE), "w") as f:
      f.write(train_config_json)


def run_model_config(workdir: str, **compute: Any) -> NeoConfig:
  """The NeoConfig a run trains: every field, from train_config.json's `model` section
  (config.json is the HF form for other tools; it does not carry every field)."""
  config_path = path(workdir, TRAIN_CONFIG_FILE)
  recipe = json.loads(config_path.read_text())
  names = {f.name for f in dataclasses.fields(NeoConfig)}
  fields = {k: v for k, v in recipe.get("model", {}).items() if k in names}
  fields.update(compute)
  try:
    return NeoConfig(**fields)
  except (TypeError, ValueError) as e:
    raise UserError(f"{config_path}: bad model section ({e})") from None


def load_run_params(workdir: str, shardings: Optional[Any] = None, step: Optional[int] = None,
                    **compute: Any) -> tuple[dict, NeoConfig]:
  """(params, NeoConfig) of the newest (or `step`) checkpoint of a training run directory.

  Same contract as the loaders of `neo_jax.convert.load_checkpoint`: `compute` sets NeoConfig
  computation fields (`param_dtype` casts), `shardings` places the leaves (a tree, or a
  function of the run's NeoConfig; default: device 0).
  """
  where = path(workdir)
  if not is_run_dir(where):
    raise UserError(f"{where}: not a training run directory (expected {HOLDS})")
  config = run_model_config(where, **compute)
  manager = checkpoint_manager(where, async_save=False, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{where}: the run has no checkpoint yet")
    if callable(shardings):  # of the run's model: orbax reads only what they hold
      shardings = shardings(config)
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: device, abstract_params(config))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(config), shardings)
    restored = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  return restored["params"], config
