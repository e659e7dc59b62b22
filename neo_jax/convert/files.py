"""Checkpoint directories as files: safetensors sets (single or sharded), sizes, carried files.

Shared by the HF NEO reader/writer and the Qwen3 initialiser; knows nothing of the model.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from neo_jax.convert.safetensors_io import SafetensorsFile, TensorSpec, write_safetensors
from neo_jax.data.tokenizer import HF_TOKENIZER_FILES
from neo_jax.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tokenizer and generation files that travel with the weights in both directions.
CARRIED_FILES = HF_TOKENIZER_FILES + ("generation_config.json",)
CARRIED_GLOBS = ("chat_template.*",)


def has_safetensors(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, n)) for n in (SINGLE_FILE, INDEX_FILE))


class TensorSet:
  """All tensors of a safetensors checkpoint directory: one file, or shards plus an index."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.fspath(directory)
    index_path = os.path.join(self.directory, INDEX_FILE)
    single_path = os.path.join(self.directory, SINGLE_FILE)
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}  # tensor name -> file name
    if os.path.isfile(index_path):
      self._open_index(index_path)
    elif os.path.isfile(single_path):
      self._files[SINGLE_FILE] = SafetensorsFile(single_path)
      self._where = {k: SINGLE_FILE for k in self._files[SINGLE_FILE].keys()}
    else:
      raise UserError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")

  def _open_index(self, index_path: str) -> None:
    try:
      with open(index_path) as f:
        index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise UserError(f"{index_path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
      raise UserError(f'{index_path}: bad index, expected {{"weight_map": {{tensor: file}}}}')
    for name in sorted(set(weight_map.values())):
      path = os.path.join(self.directory, name)
      if os.path.basename(name) != name or not os.path.isfile(path):
        count = sum(v == name for v in weight_map.values())
        raise UserError(f"{index_path}: missing shard {name} (listed for {count} tensors)")
      self._files[name] = SafetensorsFile(path)
    for key, name in weight_map.items():
      if key not in self._files[name]:
        raise UserError(f"{index_path}: lists {key} in {name}, but that shard does not hold it")
    self._where = dict(weight_map)

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: self._files[f].shape(k) for k, f in self._where.items()}

  def dtypes(self) -> dict[str, np.dtype]:
    return {k: self._files[f].dtype(k) for k, f in self._where.items()}

  def __getitem__(self, key: str) -> np.ndarray:
    return self._files[self._where[key]][key]

  def read(self, key: str, index: tuple = ()) -> np.ndarray:
    """A copy of one slice of a tensor, its pages released after (SafetensorsFile.read)."""
    return self._files[self._where[key]].read(key, index)


def parse_size(text: str) -> int:
  """ "5GB" / "500MB" / "2GiB" / "123" -> bytes (decimal units as HF, binary with "i")."""
  units = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
  }
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
  if not match or match.group(2).upper() not in units:
    raise UserError(f"--max-shard-size: cannot read {text!r}; use e.g. 5GB, 500MB or 2GiB")
  size = int(float(match.group(1)) * units[match.group(2).upper()])
  if size <= 0:
    raise UserError(f"--max-shard-size: {text!r} must be positive")
  return size


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
  """Consecutive groups of tensors of at most `max_shard_bytes` (a larger tensor stands alone)."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    if max_shard_bytes is not None and shards[-1] and size + spec.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += spec.nbytes
  return shards


def write_tensor_set(
  directory: str,
  specs: Sequence[TensorSpec],
  produce: Callable[[str], np.ndarray],
  max_shard_bytes: int | None = None,
  on_tensor: Callable[[str], None] | None = None,
) -> list[str]:
  """Writes model.safetensors, or numbered shards plus the index; returns the file names."""
  shard_glob = os.path.join(glob.escape(directory), "model-*-of-*.safetensors")
  stale = [os.path.join(directory, n) for n in (SINGLE_FILE, INDEX_FILE)] + glob.glob(shard_glob)
  for path in stale:
    if os.path.isfile(path):
      os.remove(path)
  shards = plan_shards(specs, max_shard_bytes)
  if len(shards) == 1:
    write_safetensors(os.path.join(directory, SINGLE_FILE), shards[0], produce, on_tensor=on_tensor)
    return [SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    write_safetensors(os.path.join(directory, name), shard, produce, on_tensor=on_tensor)
    weight_map.update({spec.name: name for spec in shard})
  index = {
    "metadata": {"total_size": sum(s.nbytes for s in specs)},
    "weight_map": dict(sorted(weight_map.items())),
  }
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2)
    f.write("\n")
  return names + [INDEX_FILE]


def carried_files(directory: str) -> list[str]:
  """Names of the tokenizer/generation files present in `directory`."""
  names = [n for n in CARRIED_FILES if os.path.isfile(os.path.join(directory, n))]
  for pattern in CARRIED_GLOBS:
    matches = glob.glob(os.path.join(glob.escape(directory), pattern))
    names += sorted(os.path.basename(p) for p in matches if os.path.isfile(p))
  return names


def copy_carried_files(src: str | None, dst: str) -> list[str]:
  """Copies tokenizer and generation files from `src` (if any) into `dst`."""
  if src is None or os.path.abspath(src) == os.path.abspath(dst):
    return []
  names = carried_files(src)
  for name in names:
    shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
  return names


def prepare_output_dir(directory: str, overwrite: bool, marker_files: Iterable[str]) -> str:
  """Creates `directory`; refuses to write over an earlier checkpoint unless `overwrite`."""
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise UserError(f"{directory}: exists and is not a directory")
  existing = [m for m in marker_files if os.path.exists(os.path.join(directory, m))]
  if existing and not overwrite:
    raise UserError(f"{directory}: already holds {existing[0]}; pass --overwrite to replace it")
  os.makedirs(directory, exist_ok=True)
  return directory
