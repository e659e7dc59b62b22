"""Loading ml_collections training configs and `--config.a.b=value` overrides.

A config file defines `get_config(arg=None) -> ConfigDict` (big_vision style: it starts with
the commands that run it); `--config FILE.py:ARG` passes ARG, e.g. `configs/sft.py:neo_2b`.
`configs/common.py` sits next to the files and is importable from them as `common`.
Overrides name existing fields only and take that field's type; a bad name or value is a
one-line UserError that names it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from neo_jax.config import NeoConfig
from neo_jax.data.augment import parse_augment
from neo_jax.errors import UserError
from neo_jax.parallel.sharding import RULES, Rules, rules_from_table
from neo_jax.trainer.optimizer import SCHEDULES, STAGE_TRAINABLE
from neo_jax.trainer.step import NAN_POLICIES

PREFIX = "--config."


def _load_module(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py` or `path/to/config.py:ARG` -> get_config(ARG)."""
  path, _, arg = spec.partition(":")
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise UserError(f"--config {spec}: no such file")
  directory = os.path.dirname(path)
  common = os.path.join(directory, "common.py")
  saved_common = sys.modules.get("common")
  try:
    if os.path.isfile(common) and path != common:
      sys.modules["common"] = _load_module(common, "common")
    module = _load_module(path, f"neo_jax_config_{os.path.basename(path)[:-3]}")
  finally:
    if saved_common is not None:
      sys.modules["common"] = saved_common
    else:
      sys.modules.pop("common", None)
  if not hasattr(module, "get_config"):
    raise UserError(f"--config {spec}: the file defines no get_config()")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # a bad argument: the config file says what it takes
    raise UserError(f"--config {spec}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(
      f"--config {spec}: get_config() returned {type(config).__name__}, not a ConfigDict"
    )
  return config


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
  """['--config.a.b=1', '--config.c', '2'] -> [('a.b', '1'), ('c', '2')]."""
  out, i = [], 0
  args = list(args)
  while i < len(args):
    arg = args[i]
    if not arg.startswith(PREFIX):
      raise UserError(f"unexpected argument {arg!r} (overrides look like --config.FIELD=VALUE)")
    name, eq, value = arg[len(PREFIX) :].partition("=")
    if not eq:
      if i + 1 >= len(args):
        raise UserError(f"{arg}: missing value")
      value = args[i + 1]
      i += 1
    if not name:
      raise UserError(f"{arg}: empty field name")
    out.append((name, value))
    i += 1
  return out


def _parse_value(text: str, current: Any, name: str) -> Any:
  """`text` read as the type of the field's current value."""
  kind = type(current)
  try:
    if isinstance(current, bool):
      lowered = text.strip().lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):  # a Python literal, or comma-separated words
      if not text.strip():
        return kind()
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = tuple(part.strip() for part in text.split(","))
      if isinstance(value, (str, int, float)):
        value = (value,)
      return kind(value)
    if current is None:
      try:
        return ast.literal_eval(text)
      except (ValueError, SyntaxError):
        return text
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise UserError(f"--config.{name}={text}: not a valid {kind.__name__}") from None


def apply_override(config: ml_collections.ConfigDict, name: str, text: str) -> None:
  node = config
  parts = name.split(".")
  for i, part in enumerate(parts[:-1]):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise UserError(f"--config.{name}: no field {'.'.join(parts[: i + 1])!r} in the config")
    node = node[part]
  leaf = parts[-1]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    where = ".".join(parts[:-1]) or "the config"
    choices = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    raise UserError(f"--config.{name}: no field {leaf!r} in {where} (fields: {', '.join(choices)})")
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise UserError(
      f"--config.{name}: is a group of fields, set one of {', '.join(sorted(current.keys()))}"
    )
  field_type = node.get_type(leaf) if hasattr(node, "get_type") else type(current)
  if current is None and field_type not in (type(None), None):
    current = field_type()
  value = _parse_value(text, current, name)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise UserError(f"--config.{name}={text}: {e}") from None


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of `spec` with command-line overrides applied, then validated."""
  config = load_config_file(spec)
  for name, value in parse_overrides(overrides):
    apply_override(config, name, value)
  validate(config)
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


# --- pieces of the config as library objects --------------------------------------------------


def model_fields(config: NeoConfig, **overrides: Any) -> ml_collections.ConfigDict:
  """Every NeoConfig field as a ConfigDict entry (so each can be overridden)."""
  fields = dataclasses.asdict(config.replace(**overrides))
  return ml_collections.ConfigDict(fields)


def model_config(config: ml_collections.ConfigDict) -> NeoConfig:
  names = {f.name for f in dataclasses.fields(NeoConfig)}
  unknown = sorted(set(config.model.keys()) - names)
  if unknown:
    raise UserError(f"config.model: unknown NeoConfig fields {unknown}")
  try:
    return NeoConfig(**config.model.to_dict())
  except ValueError as e:
    raise UserError(f"config.model: {e}") from None


def sharding_rules(config: ml_collections.ConfigDict) -> Rules:
  """The logical-axis rules of `config.mesh.rules` (neo_jax/parallel/sharding.py's RULES for a
  config without the table)."""
  if "rules" not in config.mesh:
    return RULES
  try:
    return rules_from_table(config.mesh.rules.to_dict())
  except ValueError as e:
    raise UserError(f"config.mesh.rules: {e}") from None


# sequence fields and what each element must be (a tuple of anything passes the override
# parser: `--config.data.sources=5` gives (5,))
_SEQUENCE_FIELDS = (
  ("trainable", str, "regexes over parameter paths, e.g. '(\"llm/.*\",)'"),
  ("data.sources", str, "source specs such as 'easy_vqa/vqa' or 'jsonl:/data/x.jsonl'"),
  ("data.weights", (int, float), "positive numbers, one per source"),
  ("data.text_sources", str, "source specs such as 'pydoc/text'"),
  ("eval.sources", str, "source specs such as 'easy_vqa/vqa' or 'jsonl:/data/x.jsonl'"),
  ("data.augment", str, "augmentations, e.g. ('flip', 'shift:0.0625')"),
)


def _field(config: ml_collections.ConfigDict, dotted: str, default: Any = None) -> Any:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "get") or part not in node:
      return default
    node = node[part]
  return node


def _check_sequences(config: ml_collections.ConfigDict) -> list[tuple[bool, str]]:
  checks = []
  for name, kind, what in _SEQUENCE_FIELDS:
    value = _field(config, name, ())
    ok = isinstance(value, (tuple, list)) and all(
      isinstance(v, kind) and not isinstance(v, bool) for v in value
    )
    checks.append((ok, f"{name}={value!r} must be a tuple of {what}"))
  augment_ok = checks[-1][0]
  weights, sources = _field(config, "data.weights", ()), _field(config, "data.sources", ())
  if checks[2][0] and weights:
    checks.append((all(w > 0 for w in weights), f"data.weights={tuple(weights)!r} must all be > 0"))
    checks.append(
      (
        len(weights) == len(sources),
        f"data.weights has {len(weights)} entries for {len(sources)} data.sources",
      )
    )
  if augment_ok:
    try:
      parse_augment(_field(config, "data.augment", ()))
    except ValueError as e:
      checks.append((False, f"data.{e}"))
  return checks


def _cadence_checks(config: ml_collections.ConfigDict) -> list[tuple[bool, str]]:
  """Counts and cadences: a zero or negative one would fail (or never fire) mid-run."""
  positive = (
    "checkpoint.every_steps",
    "checkpoint.max_to_keep",
    "log.every_steps",
    "data.seq_len",
    "eval.max_new_tokens",
    "mesh.data",
    "mesh.tensor",
  )
  non_negative = (
    "data.batch_size",
    "data.rows_per_shard",
    "eval.every_steps",
    "eval.heldout_batches",
    "eval.vqa_examples",
    "data.visual_budget",
    "data.num_workers",
    "data.read_threads",
    "optimizer.warmup_steps",
    "mesh.num_devices",
  )
  checks = []
  for name in positive:
    value = _field(config, name)
    if value is not None:
      checks.append((value > 0, f"{name}={value} must be > 0"))
  for name in non_negative:
    value = _field(config, name)
    if value is not None:
      note = " (0: off)" if name.startswith("eval.") else ""
      checks.append((value >= 0, f"{name}={value} must be >= 0{note}"))
  rows, per_shard = _field(config, "data.batch_size"), _field(config, "data.rows_per_shard")
  if rows is not None and rows <= 0:  # 0: the batch follows the mesh, per_shard rows a shard
    checks.append(
      (
        (per_shard or 0) > 0,
        f"data.batch_size={rows} needs data.rows_per_shard > 0 (rows of each batch "
        "shard per micro-batch), or set data.batch_size to the rows per update",
      )
    )
  fsdp = _field(config, "mesh.fsdp")
  if fsdp is not None:
    checks.append(
      (fsdp >= 1 or fsdp == -1, f"mesh.fsdp={fsdp} must be >= 1, or -1 (all remaining devices)")
    )
  for name in (
    "max_skipped_share",
    "data.text_ratio",
    "optimizer.warmup_ratio",
    "optimizer.min_lr_ratio",
  ):
    value = _field(config, name)
    if value is not None:
      checks.append((0.0 <= value <= 1.0, f"{name}={value} must be within [0, 1]"))
  return checks


def validate(config: ml_collections.ConfigDict) -> None:
  """Types, ranges and cross-field checks, before any work starts: what would otherwise fail
  deep inside a run (or after its first step). The message names the field; the fix is the
  config file or `--config.FIELD=VALUE`."""
  checks = [
    (
      config.stage in STAGE_TRAINABLE,
      f"stage={config.stage!r} is not one of {sorted(STAGE_TRAINABLE)}",
    ),
    (config.total_steps > 0, f"total_steps={config.total_steps} must be > 0"),
    (config.grad_accum_steps >= 1, f"grad_accum_steps={config.grad_accum_steps} must be >= 1"),
    *_cadence_checks(config),
    (
      config.data.batch_size % config.grad_accum_steps == 0,
      f"data.batch_size={config.data.batch_size} is not divisible by grad_accum_steps="
      f"{config.grad_accum_steps}",
    ),
    (
      config.optimizer.schedule in SCHEDULES,
      f"optimizer.schedule={config.optimizer.schedule!r} is not one of {SCHEDULES}",
    ),
    (
      config.nan_policy in NAN_POLICIES,
      f"nan_policy={config.nan_policy!r} is not one of {NAN_POLICIES}",
    ),
    (
      config.data.pipeline in ("grain", "synthetic"),
      f"data.pipeline={config.data.pipeline!r} is not 'grain' or 'synthetic'",
    ),
    (
      config.init.format in ("run", "neo", "qwen3"),
      f"init.format={config.init.format!r} is not one of 'run', 'neo', 'qwen3'",
    ),
    (config.loss.chunk_size > 0, f"loss.chunk_size={config.loss.chunk_size} must be > 0"),
    (
      config.loss.positions_per_row >= 0,
      f"loss.positions_per_row={config.loss.positions_per_row} must be >= 0",
    ),
    (
      config.loss.vocab_chunk >= 0,
      f"loss.vocab_chunk={config.loss.vocab_chunk} must be >= 0 (0: the whole vocabulary)",
    ),
    *_check_sequences(config),
  ]
  for ok, message in checks:  # each message starts with the field it names
    if not ok:
      field = re.match(r"[\w.]+", message).group(0)
      raise UserError(f"config: {message}; fix it in the config file or with --config.{field}=...")
  model_config(config)
  sharding_rules(config)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A config saved by `to_json` (e.g. WORKDIR/train_config.json)."""
  return ml_collections.ConfigDict(json.loads(text))
