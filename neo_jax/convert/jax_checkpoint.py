"""The neo-jax parameter checkpoint: DIR/params (orbax), DIR/config.json, tokenizer files.

config.json is the HF NEO config (NeoConfig.to_hf_dict), so a neo-jax directory and an HF
directory describe their model the same way; the tokenizer files sit next to it under their
HF names, so converting back to HF carries them along.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.convert import files
from neo_jax.convert.hf_checkpoint import (
  CONFIG_FILE,
  neo_config_from_dict,
  read_config_json,
  stored_param_dtype,
)
from neo_jax.convert.mapping import ParamPath, check_covers
from neo_jax.errors import UserError, read_or_reason
from neo_jax.model import abstract_params

PARAMS_DIR = "params"


def is_params_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
    os.path.join(path, PARAMS_DIR)
  )


def _checkpointer():
  import orbax.checkpoint as ocp  # imported on use: orbax takes a second to import

  return ocp.StandardCheckpointer()


def save_params(
  directory: str,
  params: Mapping,
  config: NeoConfig,
  tokenizer_dir: str | None = None,
  *,
  overwrite: bool = False,
) -> str:
  """Writes DIR/params, DIR/config.json and the tokenizer files of `tokenizer_dir`."""
  check_covers(params, config)
  directory = files.prepare_output_dir(directory, overwrite, (PARAMS_DIR, CONFIG_FILE))
  checkpointer = _checkpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=overwrite)
  checkpointer.wait_until_finished()
  config.save_hf(directory, torch_dtype=stored_param_dtype(params))
  files.copy_carried_files(tokenizer_dir, directory)
  return directory


def _path_str(path: ParamPath) -> str:
  return "/".join(path)


def _check_shapes(stored: Mapping, config: NeoConfig, where: str) -> None:
  """Names the first parameter whose presence or shape disagrees with config.json."""
  expected = {
    tuple(k.key for k in p): v.shape
    for p, v in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
  }
  found = {
    tuple(k.key for k in p): tuple(v.shape)
    for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]
  }
  for path, shape in expected.items():
    if path not in found:
      raise UserError(f"{where}: missing parameter {_path_str(path)} {list(shape)}")
  for path, shape in found.items():
    if path not in expected:
      raise UserError(
        f"{where}: unexpected parameter {_path_str(path)} {list(shape)} "
        f"(config.json: tie_word_embeddings={config.tie_word_embeddings}, "
        f"{config.num_hidden_layers} layers)"
      )
    if shape != tuple(expected[path]):
      raise UserError(
        f"{where}: {_path_str(path)}: checkpoint has {list(shape)}, model "
        f"expects {list(expected[path])}"
      )


def _plain(tree: Any) -> Any:
  """orbax tree metadata -> nested plain dicts with ArrayMetadata leaves."""
  if isinstance(tree, Mapping) or hasattr(tree, "items"):  # orbax's tree is dict-like only
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def load_params(
  directory: str, shardings: Any | None = None, **compute: Any
) -> tuple[dict, NeoConfig]:
  """Restores (params, NeoConfig) from a neo-jax parameter directory.

  `shardings` is a tree of jax.sharding.Sharding matching the parameters (default: the
  first device). `compute` sets NeoConfig's computation fields; `param_dtype` there casts the
  leaves while restoring, otherwise they keep their stored dtypes.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not is_params_dir(directory):
    raise UserError(
      f"{directory}: not a neo-jax parameter directory (expected {CONFIG_FILE} and {PARAMS_DIR}/)"
    )
  config = neo_config_from_dict(
    read_config_json(directory), os.path.join(directory, CONFIG_FILE), **compute
  )
  checkpointer = _checkpointer()
  params_path = os.path.join(directory, PARAMS_DIR)
  damaged = (
    f"; the parameter directory is damaged: convert or save it again (e.g. "
    f"`neo-jax convert hf-to-jax`) or restore {PARAMS_DIR}/ from a copy"
  )
  stored, reason = read_or_reason(lambda: _plain(checkpointer.metadata(params_path).item_metadata))
  if reason is not None:
    raise UserError(f"{params_path}: unreadable ({reason}){damaged}")
  if not stored or not jax.tree.leaves(stored):
    raise UserError(
      f"{params_path}: lists no parameters (its _METADATA or array index is "
      f"missing or unreadable){damaged}"
    )
  _check_shapes(stored, config, params_path)
  cast = compute.get("param_dtype")
  if callable(shardings):
    shardings = shardings(config)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, stored)
  target = jax.tree.map(
    lambda meta, sharding: jax.ShapeDtypeStruct(
      tuple(meta.shape), np.dtype(cast) if cast else meta.dtype, sharding=sharding
    ),
    stored,
    shardings,
  )
  params, reason = read_or_reason(lambda: checkpointer.restore(params_path, target))
  if reason is not None:  # a truncated or missing array file
    raise UserError(f"{params_path}: unreadable ({reason}){damaged}")
  if cast is None:
    config = config.replace(param_dtype=stored_param_dtype(params))
  return params, config
