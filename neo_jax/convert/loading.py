"""`load_checkpoint(path)`: any kind of NEO checkpoint directory -> (params, NeoConfig).

Kinds are a small registry, tried in order, each recognised by the files it holds: training run
directories (neo_jax/run_dir.py), neo-jax parameter directories and HF NEO directories, so
every command that takes a checkpoint accepts all of them. `register_kind` adds another.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax

from neo_jax import run_dir
from neo_jax.config import NeoConfig
from neo_jax.convert import hf_checkpoint, jax_checkpoint
from neo_jax.errors import UserError

Loader = Callable[..., tuple[dict, NeoConfig]]  # (path, shardings=None, **compute)


@dataclasses.dataclass(frozen=True)
class CheckpointKind:
  name: str
  detect: Callable[[str], bool]  # directory -> does it hold this kind
  load: Loader
  holds: str  # what such a directory contains, for error messages


_KINDS: list[CheckpointKind] = []


def register_kind(
  name: str, detect: Callable[[str], bool], load: Loader, holds: str, first: bool = False
) -> None:
  """Adds (or replaces) a checkpoint kind; `first` makes it win over the existing kinds."""
  kind = CheckpointKind(name, detect, load, holds)
  _KINDS[:] = [k for k in _KINDS if k.name != name]
  _KINDS.insert(0 if first else len(_KINDS), kind)


def unregister_kind(name: str) -> None:
  _KINDS[:] = [k for k in _KINDS if k.name != name]


def kinds() -> list[str]:
  return [k.name for k in _KINDS]


def detect_kind(path: str) -> CheckpointKind:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise UserError(f"{path}: no such checkpoint directory")
  if not os.path.isdir(path):
    raise UserError(f"{path}: a checkpoint is a directory, not a file")
  for kind in _KINDS:
    if kind.detect(path):
      return kind
  expected = "; ".join(f"{k.name} ({k.holds})" for k in _KINDS)
  raise UserError(f"{path}: not a checkpoint directory; expected one of: {expected}")


def load_checkpoint(
  path: str, shardings: Any | None = None, **compute: Any
) -> tuple[dict, NeoConfig]:
  """(params, NeoConfig) from any registered kind of checkpoint directory.

  `compute` sets NeoConfig's computation fields (dtype, param_dtype, attention_impl, ...);
  `param_dtype` casts the parameters. `shardings` (a tree of jax.sharding.Sharding, or a
  function of the checkpoint's NeoConfig returning one) places them, each process reading
  only what its devices hold; by default they land on this process's first device.
  """
  return detect_kind(path).load(os.fspath(path), shardings=shardings, **compute)


def _load_hf(path: str, shardings: Any | None = None, **compute: Any):
  if callable(shardings):  # each process reads the slices its devices hold
    return hf_checkpoint.read_hf_neo(path, shardings=shardings, **compute)
  params, config = hf_checkpoint.read_hf_neo(path, **compute)
  target = shardings if shardings is not None else jax.local_devices()[0]
  return jax.device_put(params, target), config


register_kind(run_dir.RUN_KIND, run_dir.is_run_dir, run_dir.load_run_params, run_dir.HOLDS)
register_kind(
  "neo-jax params",
  jax_checkpoint.is_params_dir,
  jax_checkpoint.load_params,
  f"{hf_checkpoint.CONFIG_FILE} + {jax_checkpoint.PARAMS_DIR}/",
)
register_kind(
  "HF NEO",
  hf_checkpoint.is_hf_dir,
  _load_hf,
  f"{hf_checkpoint.CONFIG_FILE} + model.safetensors or model.safetensors.index.json",
)
