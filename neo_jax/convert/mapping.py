"""The one table between HF NEO state-dict keys and the neo-jax parameter tree.

Every HF tensor (docs/reference/neo.md#state-dict-keys) maps to one parameter path plus a
layout transform; both conversion directions read this table, so they cannot disagree.
Per-layer keys of HF layer i land in group `pre_buffer` at index i when i < E
(= num_prebuffer_layers), else in group `llm` at index i - E, stacked on the leading axis of
each leaf.

Layouts (PyTorch -> ours):
  linear      Linear weight [out, in] -> kernel [in, out] = W.T
  patch_conv  Conv2d [C, 3, 16, 16] -> kernel [768, C] = W.reshape(C, 768).T, inputs (c, py, px)
  merge_conv  Conv2d [D, C, 2, 2] -> kernel [4C, D] in (dy, dx, c) row order
  copy        biases, norm weights, the embedding table
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.errors import UserError
from neo_jax.model import abstract_params

Array = Any  # numpy or jax array (transforms use only methods both have)
ParamPath = tuple[str, ...]


class Transform(NamedTuple):
  """A pair of inverse layout maps between the PyTorch tensor and our leaf."""

  to_params: Callable[[Array, NeoConfig], Array]
  to_hf: Callable[[Array, NeoConfig], Array]


COPY = Transform(lambda w, cfg: w, lambda p, cfg: p)
LINEAR = Transform(lambda w, cfg: w.T, lambda k, cfg: k.T)
PATCH_CONV = Transform(
  lambda w, cfg: w.reshape(w.shape[0], -1).T,
  lambda k, cfg: k.T.reshape(k.shape[1], cfg.num_channels, cfg.patch_size, cfg.patch_size),
)
MERGE_CONV = Transform(
  lambda w, cfg: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
  lambda k, cfg: k.reshape(cfg.merge_size, cfg.merge_size, -1, k.shape[1]).transpose(3, 2, 0, 1),
)


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # HF key; per-layer entries hold the part after `language_model.model.layers.{i}.`
  path: ParamPath  # parameter path; per-layer entries: the path inside a layer group
  transform: Transform
  untied_only: bool = False  # present only when the LM head is not tied to the embeddings


LAYER_PREFIX = "language_model.model.layers."
PREBUFFER_GROUP, LLM_GROUP = "pre_buffer", "llm"

GLOBAL_ENTRIES: tuple[Entry, ...] = (
  Entry(
    "vision_model.embeddings.patch_embedding.weight",
    ("vision", "patch_embedding", "kernel"),
    PATCH_CONV,
  ),
  Entry(
    "vision_model.embeddings.patch_embedding.bias", ("vision", "patch_embedding", "bias"), COPY
  ),
  Entry(
    "vision_model.embeddings.dense_embedding.weight",
    ("vision", "dense_embedding", "kernel"),
    MERGE_CONV,
  ),
  Entry(
    "vision_model.embeddings.dense_embedding.bias", ("vision", "dense_embedding", "bias"), COPY
  ),
  Entry("language_model.model.embed_tokens.weight", ("embed_tokens", "embedding"), COPY),
)
LAYER_ENTRIES: tuple[Entry, ...] = tuple(
  [
    Entry(f"self_attn.{n}.weight", ("self_attn", n, "kernel"), LINEAR)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_proj_hw", "k_proj_hw")
  ]
  + [
    Entry(f"self_attn.{n}.weight", ("self_attn", n, "scale"), COPY)
    for n in ("q_norm", "k_norm", "q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w")
  ]
  + [
    Entry(f"mlp.{n}.weight", ("mlp", n, "kernel"), LINEAR)
    for n in ("gate_proj", "up_proj", "down_proj")
  ]
  + [
    Entry(f"{n}.weight", (n, "scale"), COPY)
    for n in ("input_layernorm", "post_attention_layernorm")
  ]
)
FINAL_ENTRIES: tuple[Entry, ...] = (
  Entry("language_model.model.norm.weight", ("norm", "scale"), COPY),
  Entry("language_model.lm_head.weight", ("lm_head", "kernel"), LINEAR, untied_only=True),
)

LM_HEAD_KEY = "language_model.lm_head.weight"
EMBED_KEY = "language_model.model.embed_tokens.weight"


class Location(NamedTuple):
  """Where one HF tensor lives in the parameter tree."""

  entry: Entry
  path: ParamPath  # full path of the (possibly stacked) leaf
  index: int | None  # position on the stacked layer axis, None for unstacked leaves


def layer_group(layer: int, config: NeoConfig) -> tuple[str, int]:
  """(group, index in group) of HF decoder layer `layer`."""
  e = config.num_prebuffer_layers
  return (PREBUFFER_GROUP, layer) if layer < e else (LLM_GROUP, layer - e)


def locations(config: NeoConfig) -> dict[str, Location]:
  """Every HF key a model with this config has, in checkpoint order, with its location."""
  out: dict[str, Location] = {}
  for entry in GLOBAL_ENTRIES:
    out[entry.hf] = Location(entry, entry.path, None)
  for layer in range(config.num_hidden_layers):
    group, index = layer_group(layer, config)
    for entry in LAYER_ENTRIES:
      out[f"{LAYER_PREFIX}{layer}.{entry.hf}"] = Location(entry, (group,) + entry.path, index)
  for entry in FINAL_ENTRIES:
    if not (entry.untied_only and config.tie_word_embeddings):
      out[entry.hf] = Location(entry, entry.path, None)
  return out


def leaf_paths(config: NeoConfig) -> list[ParamPath]:
  """Parameter paths the table produces for this config (one per stacked leaf)."""
  return list(dict.fromkeys(loc.path for loc in locations(config).values()))


def _get(tree: Mapping, path: ParamPath) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _set(tree: dict, path: ParamPath, value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _leaf_shape(hf_shape: Sequence[int], loc: Location, config: NeoConfig) -> tuple[int, ...]:
  spec = jax.ShapeDtypeStruct(tuple(hf_shape), np.float32)
  return tuple(jax.eval_shape(lambda w: loc.entry.transform.to_params(w, config), spec).shape)


def _hf_shape(leaf_shape: Sequence[int], loc: Location, config: NeoConfig) -> tuple[int, ...]:
  spec = jax.ShapeDtypeStruct(tuple(leaf_shape), np.float32)
  return tuple(jax.eval_shape(lambda p: loc.entry.transform.to_hf(p, config), spec).shape)


def _fmt(shape: Sequence[int]) -> str:
  return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def expected_hf_shapes(config: NeoConfig) -> dict[str, tuple[int, ...]]:
  """HF key -> PyTorch shape of every tensor of a model with this config."""
  shapes = abstract_params(config)
  check_covers(shapes, config)
  out = {}
  for key, loc in locations(config).items():
    leaf_shape = _get(shapes, loc.path).shape
    out[key] = _hf_shape(leaf_shape[1:] if loc.index is not None else leaf_shape, loc, config)
  return out


def check_covers(params: Mapping, config: NeoConfig) -> None:
  """Fails when a parameter tree and the table for `config` disagree: a tree that belongs to
  another config (tied vs untied head, no pre-Buffer), or a model change the table misses."""
  tree_paths = {
    tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  table_paths = set(leaf_paths(config))
  if tree_paths != table_paths:
    raise ValueError(
      f"parameters do not match the conversion table for this config "
      f"(tie_word_embeddings={config.tie_word_embeddings}, "
      f"{config.num_prebuffer_layers} pre-Buffer layers): only in the parameters "
      f"{sorted(tree_paths - table_paths)}, only in the table "
      f"{sorted(table_paths - tree_paths)}"
    )


def check_tensors(found: Mapping[str, Sequence[int]], config: NeoConfig) -> None:
  """One-line UserError for the first missing key, unexpected key or shape mismatch."""
  expected = expected_hf_shapes(config)
  missing = [k for k in expected if k not in found]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise UserError(
      f"checkpoint is missing {missing[0]}{more}; model expects {_fmt(expected[missing[0]])}"
    )
  unexpected = [k for k in found if k not in expected]
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    why = (
      " (the config ties the LM head to the embeddings)"
      if unexpected[0] == LM_HEAD_KEY
      else f" (not part of a NEO model with {config.num_hidden_layers} layers)"
    )
    raise UserError(
      f"checkpoint has unexpected tensor {unexpected[0]} {_fmt(found[unexpected[0]])}{more}{why}"
    )
  for key, shape in expected.items():
    if tuple(found[key]) != tuple(shape):
      raise UserError(f"{key}: checkpoint has {_fmt(found[key])}, model expects {_fmt(shape)}")


class _LeafPlan(NamedTuple):
  """One parameter leaf as the HF tensors `keys` fill it (several when stacked over layers)."""

  path: ParamPath
  keys: list[str]
  locs: list[Location]  # where each of `keys` goes (layer index when stacked, transform)
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def stacked(self) -> bool:
    return self.locs[0].index is not None


def _leaf_plans(
  shapes: Mapping[str, Sequence[int]],
  dtypes: Mapping[str, np.dtype],
  config: NeoConfig,
  dtype: np.dtype | None,
) -> list[_LeafPlan]:
  """The leaves an HF checkpoint fills, after checking its tensors against the config; a
  leaf's dtype is `dtype`, or the checkpoint's (promoted over its tensors)."""
  check_tensors(shapes, config)
  locs = locations(config)
  groups: dict[ParamPath, list[str]] = {}
  for key, loc in locs.items():
    groups.setdefault(loc.path, []).append(key)
  plans = []
  for path, keys in groups.items():
    key_locs = [locs[k] for k in keys]
    shape = tuple(_leaf_shape(shapes[keys[0]], key_locs[0], config))
    if key_locs[0].index is not None:
      shape = (len(keys),) + shape
    leaf_dtype = (
      np.dtype(dtype) if dtype is not None else np.result_type(*(dtypes[k] for k in keys))
    )
    plans.append(_LeafPlan(path, keys, key_locs, shape, leaf_dtype))
  return plans


def params_from_hf(
  read: Callable[[str], np.ndarray],
  shapes: Mapping[str, Sequence[int]],
  dtypes: Mapping[str, np.dtype],
  config: NeoConfig,
  dtype: np.dtype | None = None,
  on_tensor: Callable[[str], None] | None = None,
) -> dict:
  """HF tensors -> parameter tree of numpy arrays.

  `read(key)` returns one PyTorch-layout tensor (e.g. a memory-mapped view); `shapes` and
  `dtypes` describe every tensor of the checkpoint, checked against the config before any
  data is read. Leaves keep the checkpoint dtype unless `dtype` is given.
  """
  params: dict = {}
  for leaf_plan in _leaf_plans(shapes, dtypes, config, dtype):
    leaf = np.empty(leaf_plan.shape, leaf_plan.dtype)
    for key, loc in zip(leaf_plan.keys, leaf_plan.locs):
      value = loc.entry.transform.to_params(read(key), config)
      if loc.index is None:
        leaf[...] = value
      else:
        leaf[loc.index] = value
      if on_tensor is not None:
        on_tensor(key)
    _set(params, leaf_plan.path, leaf)
  return params


def _leaf_slice(
  read: Callable[[str, tuple], np.ndarray], key: str, loc: Location, index: tuple, config: NeoConfig
) -> np.ndarray:
  """`index` of one HF tensor's leaf layout, reading only that slice where the layout is a
  transpose or a copy (every large tensor), else the whole (small) tensor."""
  transform = loc.entry.transform
  if transform is COPY:
    return read(key, index)
  if transform is LINEAR:
    rows, cols = index
    return read(key, (cols, rows)).T
  return np.asarray(transform.to_params(read(key, ()), config))[index]


def sharded_params_from_hf(
  read: Callable[[str, tuple], np.ndarray],
  shapes: Mapping[str, Sequence[int]],
  dtypes: Mapping[str, np.dtype],
  config: NeoConfig,
  shardings: Any,
  dtype: np.dtype | None = None,
) -> dict:
  """HF tensors -> parameter tree of jax arrays placed on `shardings`, each process reading
  only the slices its devices hold (`read(key, index)` returns a slice of one HF tensor)."""
  params: dict = {}
  for leaf_plan in _leaf_plans(shapes, dtypes, config, dtype):

    def piece(index, plan=leaf_plan):
      index, keys, locs = tuple(index), plan.keys, plan.locs
      if not plan.stacked:
        return _leaf_slice(read, keys[0], locs[0], index, config).astype(plan.dtype, copy=False)
      layers = range(*index[0].indices(len(keys)))
      return np.stack(
        [_leaf_slice(read, keys[i], locs[i], index[1:], config) for i in layers]
      ).astype(plan.dtype, copy=False)

    path = leaf_plan.path
    _set(params, path, jax.make_array_from_callback(leaf_plan.shape, _get(shardings, path), piece))
  return params


class HFTensors:
  """The HF view of a parameter tree: specs up front, each tensor computed on demand."""

  def __init__(self, params: Mapping, config: NeoConfig, dtype: np.dtype | None = None):
    check_covers(params, config)
    self.params, self.config = params, config
    self.dtype = None if dtype is None else np.dtype(dtype)
    self.locations = locations(config)

  def keys(self) -> list[str]:
    return list(self.locations)

  def __iter__(self) -> Iterator[str]:
    return iter(self.locations)

  def _leaf(self, key: str):
    loc = self.locations[key]
    leaf = _get(self.params, loc.path)
    return leaf if loc.index is None else leaf[loc.index]

  def spec(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
    loc = self.locations[key]
    leaf = _get(self.params, loc.path)
    shape = leaf.shape if loc.index is None else leaf.shape[1:]
    return _hf_shape(shape, loc, self.config), self.dtype or np.dtype(leaf.dtype)

  def __getitem__(self, key: str) -> np.ndarray:
    loc = self.locations[key]
    value = np.asarray(loc.entry.transform.to_hf(np.asarray(self._leaf(key)), self.config))
    return np.ascontiguousarray(value.astype(self.dtype or value.dtype, copy=False))


def nonfinite_tensors(params: Mapping, config: NeoConfig) -> list[str]:
  """One line per HF tensor holding NaN or Inf ("KEY: n NaN, m Inf of N values"), in
  checkpoint order: what a conversion warns about (it still converts them as they are)."""
  order = {key: i for i, key in enumerate(locations(config))}
  by_leaf: dict[ParamPath, list[tuple[str, Location]]] = {}
  for key, loc in locations(config).items():
    by_leaf.setdefault(loc.path, []).append((key, loc))
  found = []
  for path, keys in by_leaf.items():  # one host copy per (stacked) leaf
    leaf = np.asarray(jax.device_get(_get(params, path)))
    if not np.issubdtype(leaf.dtype, np.floating):
      leaf = leaf.astype(np.float32)  # bfloat16 and other ml_dtypes floats
    for key, loc in keys:
      value = leaf if loc.index is None else leaf[loc.index]
      nan = int(np.count_nonzero(np.isnan(value)))
      inf = int(np.count_nonzero(np.isinf(value)))
      if nan or inf:
        found.append((order[key], f"{key}: {nan} NaN, {inf} Inf of {value.size} values"))
  return [line for _, line in sorted(found)]
