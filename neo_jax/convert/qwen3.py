"""Initialise NEO from a Qwen3 checkpoint by the rules of NEO's training loader.

The rules and their sources: docs/reference/neo.md#initialisation-from-qwen3.

Qwen3 layer i becomes NEO layer i + E. Post-LLM layers copy every Qwen3 tensor; their
`q_proj_hw` is built per head from `q_proj` rows (quarters w1..w4 of each head -> [w1, w3, w1,
w3], the highest-frequency rotate_half pairs become the H and W pairs), `k_proj_hw` is 0 (so
all H/W logits are 0 and the model computes exactly Qwen3 on text) and the H/W norms are 1.
Pre-Buffer layers 0..E-1 draw every projection from N(0, 0.02^2) and set all norms to 1. The
vision convs take PyTorch's default init (the model's own initialisers). Embeddings, final
norm and head come from Qwen3; a missing head of an untied model is cloned from the embeddings.

The NEO tensors are produced in HF layout and go through the same table as HF checkpoints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.convert import files
from neo_jax.convert.hf_checkpoint import read_config_json, stored_param_dtype
from neo_jax.convert.mapping import (
  EMBED_KEY,
  GLOBAL_ENTRIES,
  LAYER_ENTRIES,
  LAYER_PREFIX,
  LM_HEAD_KEY,
  expected_hf_shapes,
  locations,
  params_from_hf,
  sharded_params_from_hf,
)
from neo_jax.convert.progress import progress_bar
from neo_jax.errors import UserError
from neo_jax.model.vision import PatchEmbedding

PREBUFFER_STD = 0.02
NORM_KEY = "language_model.model.norm.weight"

# Qwen3 per-layer tensors, identical names in NEO (after `language_model.`).
QWEN3_LAYER_KEYS = tuple(
  [f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
  + [f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
  + ["input_layernorm.weight", "post_attention_layernorm.weight"]
)
_QWEN3_GLOBAL = {
  "model.embed_tokens.weight": EMBED_KEY,
  "model.norm.weight": NORM_KEY,
  "lm_head.weight": LM_HEAD_KEY,
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def neo_config_from_qwen3(
  qwen: Mapping[str, Any], num_prebuffer_layers: int, **fields: Any
) -> NeoConfig:
  """NeoConfig of a Qwen3 config.json plus E pre-Buffer layers; `fields` sets the rest
  (vision_hidden_size, rope_theta_vision, rope_theta_hw, dtype, ...)."""
  model_type = qwen.get("model_type", "qwen3")
  if model_type != "qwen3":
    raise UserError(f"config.json: model_type is {model_type!r}, expected 'qwen3'")
  rope = qwen.get("rope_parameters") or qwen.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", None):
    raise UserError(f"config.json: rope type {rope_type!r} is not supported (only default RoPE)")
  rope_theta = qwen.get("rope_theta", rope.get("rope_theta"))
  if qwen.get("attention_bias"):
    raise UserError("config.json: attention_bias=true is not supported (NEO has no biases)")
  if qwen.get("hidden_act", "silu") != "silu":
    raise UserError(f"config.json: hidden_act {qwen['hidden_act']!r} is not supported (silu)")
  try:
    heads = int(qwen["num_attention_heads"])
    hidden = int(qwen["hidden_size"])
    base = dict(
      vocab_size=int(qwen["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(qwen["intermediate_size"]),
      num_hidden_layers=int(qwen["num_hidden_layers"]) + num_prebuffer_layers,
      num_prebuffer_layers=num_prebuffer_layers,
      num_attention_heads=heads,
      num_key_value_heads=int(qwen.get("num_key_value_heads") or heads),
      head_dim=int(qwen.get("head_dim") or hidden // heads),
      rope_theta=float(1_000_000.0 if rope_theta is None else rope_theta),
      rms_norm_eps=float(qwen.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(qwen.get("tie_word_embeddings", False)),
      max_position_embeddings=int(qwen.get("max_position_embeddings", 32768)),
    )
  except KeyError as e:
    raise UserError(f"config.json: missing {e.args[0]}") from None
  base.update(fields)
  try:
    return NeoConfig(**base)
  except ValueError as e:
    raise UserError(str(e)) from None


def _neo_key(qwen_key: str, prebuffer: int) -> str | None:
  match = _LAYER_RE.fullmatch(qwen_key)
  if match:
    return f"{LAYER_PREFIX}{int(match.group(1)) + prebuffer}.{match.group(2)}"
  return _QWEN3_GLOBAL.get(qwen_key)


def _check_qwen3(
  found: Mapping[str, tuple[int, ...]], config: NeoConfig, neo_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, str]:
  """Checks the Qwen3 tensors by their own names; returns NEO key -> Qwen3 key."""
  e = config.num_prebuffer_layers
  expected = {
    f"model.layers.{i}.{name}": f"{LAYER_PREFIX}{i + e}.{name}"
    for i in range(config.num_llm_layers)
    for name in QWEN3_LAYER_KEYS
  }
  expected.update({"model.embed_tokens.weight": EMBED_KEY, "model.norm.weight": NORM_KEY})
  fmt = lambda shape: "[" + ", ".join(map(str, shape)) + "]"
  for key, neo in expected.items():
    if key not in found:
      raise UserError(f"Qwen3 checkpoint is missing {key}; expected {fmt(neo_shapes[neo])}")
  for key, shape in found.items():
    if key == "lm_head.weight":
      continue
    if key not in expected:
      raise UserError(
        f"Qwen3 checkpoint has unexpected tensor {key} {fmt(shape)} (a Qwen3 with "
        f"{config.num_llm_layers} layers has none)"
      )
  if "lm_head.weight" in found and not config.tie_word_embeddings:
    expected["lm_head.weight"] = LM_HEAD_KEY
  for key, neo in expected.items():
    if tuple(found[key]) != tuple(neo_shapes[neo]):
      raise UserError(
        f"{key}: checkpoint has {fmt(found[key])}, model expects {fmt(neo_shapes[neo])}"
      )
  return {neo: key for key, neo in expected.items()}


def q_proj_hw_from_q_proj(q_weight: np.ndarray, num_heads: int) -> np.ndarray:
  """[nH*d, H] -> [nH*d, H]: per head the row quarters [w1, w3, w1, w3] of q_proj."""
  rows, hidden = q_weight.shape
  d = rows // num_heads
  quarter = d // 4
  heads = q_weight.reshape(num_heads, d, hidden)
  w1, w3 = heads[:, :quarter], heads[:, 2 * quarter : 3 * quarter]
  return np.concatenate([w1, w3, w1, w3], axis=1).reshape(rows, hidden)


def vision_init_hf(config: NeoConfig, seed: int) -> dict[str, np.ndarray]:
  """Fresh vision tensors in HF layout, from the model's own (PyTorch-default) initialisers."""
  cfg = config.replace(param_dtype="float32", dtype="float32")
  pixels = jnp.zeros((1, 1, cfg.merge_size**2, cfg.patch_dim), jnp.float32)
  rc = jnp.zeros((1, 1, 2), jnp.int32)
  variables = PatchEmbedding(cfg).init(jax.random.key(seed), pixels, rc)
  vision = {"vision": nn.meta.unbox(variables["params"])}
  out = {}
  for entry in GLOBAL_ENTRIES:
    if entry.path[0] == "vision":
      leaf = vision
      for name in entry.path:
        leaf = leaf[name]
      out[entry.hf] = np.asarray(entry.transform.to_hf(np.asarray(leaf), cfg))
  return out


def qwen3_to_neo(
  src: str,
  num_prebuffer_layers: int,
  *,
  seed: int = 0,
  dtype: str | None = None,
  progress: bool | None = None,
  shardings: Callable[[NeoConfig], Any] | None = None,
  **fields: Any,
) -> tuple[dict, NeoConfig]:
  """(numpy params, NeoConfig) of a NEO initialised from the Qwen3 directory `src`.

  Leaves take the dtype of Qwen3's embedding unless `dtype` is given; `fields` are extra
  NeoConfig fields (vision_hidden_size, rope_theta_vision, rope_theta_hw, ...).
  `shardings(config)` gives jax arrays on those shardings instead, each process reading only
  the slices of Qwen3's tensors its devices hold (new tensors are made whole, then sliced).
  """
  src = os.fspath(src)
  qwen = read_config_json(src)
  config = neo_config_from_qwen3(qwen, num_prebuffer_layers, **fields)
  tensors = files.TensorSet(src)
  neo_shapes = expected_hf_shapes(config)
  neo_to_qwen = _check_qwen3(tensors.shapes(), config, neo_shapes)
  out_dtype = np.dtype(dtype) if dtype else tensors.dtypes()["model.embed_tokens.weight"]
  vision = vision_init_hf(config, seed)
  locs = locations(config)
  entry_index = {entry.hf: i for i, entry in enumerate(LAYER_ENTRIES)}

  def read(key: str) -> np.ndarray:
    if key in neo_to_qwen:
      return tensors[neo_to_qwen[key]]
    if key == LM_HEAD_KEY:  # untied model without a stored head: clone the embeddings
      return tensors["model.embed_tokens.weight"]
    if key in vision:
      return vision[key]
    layer_text, name = key[len(LAYER_PREFIX) :].split(".", 1)
    layer, shape = int(layer_text), neo_shapes[key]
    if "norm" in name:  # every RMSNorm weight of a new tensor starts at 1
      return np.ones(shape, np.float32)
    if layer < config.num_prebuffer_layers:
      rng = np.random.default_rng([seed, layer, entry_index[name]])
      return rng.standard_normal(shape, dtype=np.float32) * np.float32(PREBUFFER_STD)
    if name == "self_attn.k_proj_hw.weight":
      return np.zeros(shape, np.float32)
    if name == "self_attn.q_proj_hw.weight":
      qwen_q = neo_to_qwen[f"{LAYER_PREFIX}{layer}.self_attn.q_proj.weight"]
      return q_proj_hw_from_q_proj(np.asarray(tensors[qwen_q]), config.num_attention_heads)
    raise AssertionError(f"no rule for {key}")

  if shardings is not None:

    def read_slice(key: str, index: tuple) -> np.ndarray:
      if key in neo_to_qwen:
        return tensors.read(neo_to_qwen[key], index)
      if key == LM_HEAD_KEY:
        return tensors.read("model.embed_tokens.weight", index)
      return np.asarray(read(key))[index]

    params = sharded_params_from_hf(
      read_slice,
      neo_shapes,
      {k: out_dtype for k in locs},
      config,
      shardings(config),
      dtype=out_dtype,
    )
    return params, config.replace(param_dtype=stored_param_dtype(params))
  with progress_bar(len(locs), "initialising NEO from Qwen3", progress) as bar:
    params = params_from_hf(
      read,
      neo_shapes,
      {k: out_dtype for k in locs},
      config,
      dtype=out_dtype,
      on_tensor=lambda _: bar.update(),
    )
  return params, config.replace(param_dtype=stored_param_dtype(params))
