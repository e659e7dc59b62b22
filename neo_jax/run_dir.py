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
    damaged_checkpoints/<step>/  steps a resumed run found unreadable, moved out of its way

Reading picks the newest step that reads back whole: a damaged newer step (a file truncated or
removed) is named in one warning and the next older one is tried; it is never deleted. A
resumed run moves it to damaged_checkpoints/ (so that the step can be saved again); read-only
loading leaves it where it is.

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
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath

from neo_jax.config import NeoConfig
from neo_jax.errors import UserError, describe_failure, read_or_reason
from neo_jax.model import abstract_params

logger = logging.getLogger("neo_jax.checkpoint")
T = TypeVar("T")

RUN_KIND = "neo-jax training run"
CHECKPOINT_DIR = "checkpoints"
MODEL_CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REFERENCE_DIR = "reference"
DAMAGED_DIR = "damaged_checkpoints"
HOLDS = f"{MODEL_CONFIG_FILE} + {TRAIN_CONFIG_FILE} + {CHECKPOINT_DIR}/<step>/"


def is_remote(workdir: str | os.PathLike) -> bool:
  """A URL (gs://...) rather than a local path."""
  return "://" in os.fspath(workdir)


def path(workdir: str | os.PathLike, *parts: str) -> epath.Path:
  """WORKDIR/parts as an epath.Path: local paths absolute, URLs as they are."""
  text = os.fspath(workdir)
  return epath.Path(text if is_remote(text) else os.path.abspath(text)).joinpath(*parts)


def is_run_dir(workdir: str | os.PathLike) -> bool:
  return (
    path(workdir, MODEL_CONFIG_FILE).is_file()
    and path(workdir, TRAIN_CONFIG_FILE).is_file()
    and path(workdir, CHECKPOINT_DIR).is_dir()
  )


def saved_steps(workdir: str) -> list[int]:
  """The steps with a checkpoint directory, oldest first (a listing: no orbax involved)."""
  directory = path(workdir, CHECKPOINT_DIR)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


class UnreadableStep(UserError):
  """A saved step that does not read back; `reason` says what is wrong with it."""

  def __init__(self, directory: str, step: int, reason: str):
    super().__init__(f"checkpoint step {step} in {directory} is unreadable ({reason})")
    self.step, self.reason = step, reason


def read_step(directory: str, step: int, item: str, read: Callable[[], T]) -> T:
  """`read()` of the folder `item` of one step; any failure (the folder missing, a file in it
  truncated or removed) becomes UnreadableStep naming the item."""
  if not path(directory, str(step), item).is_dir():
    raise UnreadableStep(directory, step, f"{item}/ is missing")
  result, reason = read_or_reason(read)
  if reason is not None:
    raise UnreadableStep(directory, step, f"{item}/: {reason}")
  return result


def read_newest(
  directory: str, steps: Iterable[int], attempt: Callable[[int], T]
) -> tuple[int, T, dict[int, str]]:
  """(step, attempt(step), {damaged step: reason}) for the newest step `attempt` reads; each
  unreadable newer step is named in one warning and left in place. A UserError saying so when
  none reads."""
  steps = sorted(steps, reverse=True)
  if not steps:
    raise UserError(f"{directory}: no checkpoint yet")
  damaged: dict[int, str] = {}
  for i, step in enumerate(steps):
    try:
      return step, attempt(step), damaged
    except UnreadableStep as e:
      damaged[step] = e.reason
      then = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no earlier step"
      logger.warning("%s; %s", e, then)
  listed = "; ".join(f"step {s}: {r}" for s, r in damaged.items())
  raise UserError(
    f"{directory}: no readable checkpoint ({listed}); restore the steps from a "
    "copy, or move them out of the directory to start the run from the beginning"
  )


def set_aside(workdir: str, steps: Iterable[int]) -> list[str]:
  """Moves the step folders `steps` to WORKDIR/damaged_checkpoints/ (kept, never deleted), so
  that a resumed run can save those steps again; returns where they went."""
  moved = []
  for step in steps:
    source = path(workdir, CHECKPOINT_DIR, str(step))
    if not source.is_dir():
      continue
    target = path(workdir, DAMAGED_DIR, str(step))
    n = 0
    while target.exists():
      n += 1
      target = path(workdir, DAMAGED_DIR, f"{step}.{n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
    moved.append(os.fspath(target))
  return moved


def checkpoint_manager(
  workdir: str, *, max_to_keep: int | None = 3, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  """The orbax manager of WORKDIR/checkpoints; `read_only` neither creates nor deletes anything
  (orbax's own read_only mode only adds warnings)."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=None if read_only else max_to_keep,
    create=not read_only,
    enable_async_checkpointing=async_save and not read_only,
  )
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
  try:
    recipe = json.loads(config_path.read_bytes().decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(
      f"{config_path}: not valid JSON ({describe_failure(e)}); the run "
      "directory's recipe is damaged: restore it from a copy (its `model` section "
      "says what the checkpoints hold)"
    ) from None
  if not isinstance(recipe, dict) or not isinstance(recipe.get("model", {}), dict):
    raise UserError(
      f"{config_path}: expected a JSON object with a `model` section; restore the file from a copy"
    )
  names = {f.name for f in dataclasses.fields(NeoConfig)}
  fields = {k: v for k, v in recipe.get("model", {}).items() if k in names}
  fields.update(compute)
  try:
    return NeoConfig(**fields)
  except (TypeError, ValueError) as e:
    raise UserError(f"{config_path}: bad model section ({e})") from None


def load_run_params(
  workdir: str, shardings: Any | None = None, step: int | None = None, **compute: Any
) -> tuple[dict, NeoConfig]:
  """(params, NeoConfig) of the newest (or `step`) checkpoint of a training run directory.

  Same contract as the loaders of `neo_jax.convert.load_checkpoint`: `compute` sets NeoConfig
  computation fields (`param_dtype` casts), `shardings` places the leaves (a tree, or a
  function of the run's NeoConfig; default: device 0).
  """
  where = path(workdir)
  if not is_run_dir(where):
    raise UserError(f"{where}: not a training run directory (expected {HOLDS})")
  config = run_model_config(where, **compute)
  if callable(shardings):  # of the run's model: orbax reads only what they hold
    shardings = shardings(config)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_params(config))
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract_params(config),
    shardings,
  )
  directory = os.fspath(path(where, CHECKPOINT_DIR))
  manager = checkpoint_manager(where, async_save=False, read_only=True)

  def attempt(s: int) -> dict:
    return read_step(
      directory,
      s,
      "params",
      lambda: manager.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))[
        "params"
      ],
    )

  try:
    saved = list(manager.all_steps())
    if step is not None:
      if step not in saved:
        raise UserError(f"{directory}: no checkpoint step {step} (saved: {saved or 'none'})")
      try:
        return attempt(step), config
      except UnreadableStep as e:
        raise UserError(f"{e}; read another step (saved: {saved})") from None
    if not saved:
      raise UserError(f"{where}: the run has no checkpoint yet")
    _, params, _ = read_newest(directory, saved, attempt)
  finally:
    manager.close()
  return params, config
