"""HF NEO directories (config.json + safetensors, sharded or not) <-> parameter trees.

Reading checks every key and shape against the config before reading data, keeps each
tensor's stored dtype unless asked otherwise, and ties the head exactly when the checkpoint
has no `language_model.lm_head.weight` (docs/reference/neo.md#state-dict-keys). Writing streams
tensors one at a time in the stored dtype (or an override), so HF -> JAX -> HF reproduces
every byte.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from neo_jax.config import DTYPES, NeoConfig
from neo_jax.convert import files
from neo_jax.convert.mapping import (
  EMBED_KEY,
  LM_HEAD_KEY,
  HFTensors,
  params_from_hf,
  sharded_params_from_hf,
)
from neo_jax.convert.progress import progress_bar
from neo_jax.convert.safetensors_io import TensorSpec
from neo_jax.errors import UserError

CONFIG_FILE = "config.json"


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and files.has_safetensors(path)


def read_config_json(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path) as f:
      config = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{directory}: no {CONFIG_FILE}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise UserError(f"{path}: not a JSON object")
  return config


def neo_config_from_dict(hf: Mapping[str, Any], where: str, **compute: Any) -> NeoConfig:
  try:
    return NeoConfig.from_hf_dict(hf, **compute)
  except (ValueError, TypeError) as e:
    raise UserError(f"{where}: {e}") from None


def dtype_label(dtype: np.dtype) -> str:
  """numpy dtype -> the name NeoConfig and config.json use ("bfloat16", "float32", ...)."""
  return np.dtype(dtype).name


def stored_param_dtype(params: Mapping) -> str:
  """The dtype that describes a tree: that of its largest leaf, the embedding table."""
  label = dtype_label(params["embed_tokens"]["embedding"].dtype)
  return label if label in DTYPES else "float32"


def read_hf_neo(
  directory: str,
  *,
  progress: bool | None = None,
  shardings: Callable[[NeoConfig], Any] | None = None,
  **compute: Any,
) -> tuple[dict, NeoConfig]:
  """Loads an HF NEO directory as (numpy parameter tree, NeoConfig).

  `compute` sets NeoConfig's computation fields; `param_dtype` there casts every leaf,
  otherwise leaves keep their stored dtypes and config.param_dtype names the embedding's.
  `shardings(config)` (a tree of shardings) gives jax arrays on them instead, each process
  reading only the slices of the tensors its devices hold.
  """
  directory = os.fspath(directory)
  hf = read_config_json(directory)
  tensors = files.TensorSet(directory)
  cast = compute.get("param_dtype")
  config = neo_config_from_dict(hf, os.path.join(directory, CONFIG_FILE), **compute)
  config = config.replace(tie_word_embeddings=LM_HEAD_KEY not in tensors)
  shapes = tensors.shapes()
  if shardings is not None:
    params = sharded_params_from_hf(
      tensors.read,
      shapes,
      tensors.dtypes(),
      config,
      shardings(config),
      dtype=None if cast is None else cast,
    )
  else:
    with progress_bar(
      len(shapes), f"reading {os.path.basename(directory.rstrip('/'))}", progress
    ) as bar:
      params = params_from_hf(
        tensors.__getitem__,
        shapes,
        tensors.dtypes(),
        config,
        dtype=None if cast is None else np.dtype(cast),
        on_tensor=lambda _: bar.update(),
      )
  if cast is None:
    config = config.replace(param_dtype=stored_param_dtype(params))
  return params, config


def write_hf_neo(
  directory: str,
  params: Mapping,
  config: NeoConfig,
  *,
  dtype: str | None = None,
  max_shard_bytes: int | None = None,
  carry_from: str | None = None,
  overwrite: bool = False,
  progress: bool | None = None,
) -> list[str]:
  """Writes an HF NEO directory: config.json, safetensors (sharded above `max_shard_bytes`),
  and the tokenizer/generation files found in `carry_from`. Returns the files written."""
  directory = files.prepare_output_dir(
    directory, overwrite, (CONFIG_FILE, files.SINGLE_FILE, files.INDEX_FILE)
  )
  tensors = HFTensors(params, config, dtype=None if dtype is None else np.dtype(dtype))
  specs = [TensorSpec(k, *tensors.spec(k)) for k in tensors]
  with progress_bar(len(specs), f"writing {os.path.basename(directory)}", progress) as bar:
    written = files.write_tensor_set(
      directory, specs, tensors.__getitem__, max_shard_bytes, on_tensor=lambda _: bar.update()
    )
  torch_dtype = dtype_label(tensors.spec(EMBED_KEY)[1])
  config.save_hf(directory, torch_dtype=torch_dtype)
  return written + [CONFIG_FILE] + files.copy_carried_files(carry_from, directory)
