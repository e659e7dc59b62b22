"""Attention probabilities of a trained NEO, for looking at what a layer attends to.

The model never materialises attention probabilities (kernels and the chunked reference keep
only the output), so this module recomputes one layer's from the model's own parameters:

    probs = attention_probs(params, config, batch, layer)     float32 [B, H, L, L]

It walks the real modules (embedding, vision, DecoderLayer with the layer's slice of the
stacked parameters) and records the query, key, value and mask ids the layer's
`NativeAttention` hands to `neo_jax.ops.attention.attention` (`capture_attention`), so the
probabilities come from exactly the rotated, normalised q/k the model uses. `layer_inputs`
gives the hidden state entering every layer. tests/test_attention_maps.py checks both against
`NeoModel.apply`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from neo_jax.config import NeoConfig
from neo_jax.model import attention as attention_module
from neo_jax.model.layers import dtype_of
from neo_jax.model.neo import (
  LAYER_GROUPS,
  DecoderLayer,
  LayerContext,
  NeoModel,
  place_visual_tokens,
  rope_tables,
)
from neo_jax.ops.masks import AttnIds, dense_mask
from neo_jax.positions import image_ids as compute_image_ids

__all__ = [
  "AttentionCall",
  "capture_attention",
  "probabilities",
  "layer_inputs",
  "attention_call",
  "attention_probs",
]


class AttentionCall(NamedTuple):
  """What one NativeAttention call passed to the attention op, and what it got back."""

  q: jax.Array  # [B, Lq, Hq, 2*head_dim], after the sub-head norms and Native-RoPE
  k: jax.Array  # [B, Lk, Hkv, 2*head_dim]
  v: jax.Array  # [B, Lk, Hkv, head_dim]
  q_ids: AttnIds
  kv_ids: AttnIds | None
  scale: float
  output: jax.Array  # [B, Lq, Hq, head_dim]


@contextlib.contextmanager
def capture_attention() -> Iterator[list[AttentionCall]]:
  """Records every attention call the model's layers make inside the block (in call order).

  Works under tracing too (the records then hold tracers of the same trace). Not thread-safe:
  it swaps the op that neo_jax.model.attention calls for a recording wrapper while it is open.
  """
  calls: list[AttentionCall] = []
  original = attention_module.attention

  def recording(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_ids: AttnIds,
    kv_ids: AttnIds | None = None,
    **kwargs: Any,
  ) -> jax.Array:
    out = original(q, k, v, q_ids, kv_ids, **kwargs)
    scale = kwargs.get("scale")
    calls.append(
      AttentionCall(q, k, v, q_ids, kv_ids, q.shape[-1] ** -0.5 if scale is None else scale, out)
    )
    return out

  attention_module.attention = recording
  try:
    yield calls
  finally:
    attention_module.attention = original


def probabilities(
  q: jax.Array, k: jax.Array, q_ids: AttnIds, kv_ids: AttnIds | None = None, *, scale: float
) -> jax.Array:
  """float32 [B, Hq, Lq, Lk]: softmax of the masked scores (GQA: head h reads kv head
  h // (Hq / Hkv)); a query with no allowed key (padding) gets an all-zero row."""
  mask = dense_mask(q_ids, kv_ids)[:, None]  # [B, 1, Lq, Lk]
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)


def _embed(
  model: NeoModel,
  input_ids: jax.Array,
  positions: jax.Array,
  segment_ids: jax.Array,
  pixels: jax.Array | None,
  pixel_rc: jax.Array | None,
  branch_ids: jax.Array | None,
) -> tuple[jax.Array, LayerContext]:
  """The input of the first layer and the context every layer shares (as NeoModel builds)."""
  cfg = model.config
  x = model.embed_tokens(input_ids).astype(dtype_of(cfg.dtype))
  if pixels is not None:
    x = place_visual_tokens(x, model.vision(pixels, pixel_rc), input_ids, cfg.img_context_token_id)
  img_ids = compute_image_ids(input_ids, positions[:, 0], cfg.img_context_token_id)
  q_ids = AttnIds(
    segment_ids.astype(jnp.int32),
    img_ids,
    None if branch_ids is None else branch_ids.astype(jnp.int32),
    None,
  )
  return x, LayerContext(rope_tables(positions, cfg), q_ids, None, None)


def _group_and_index(config: NeoConfig, layer: int) -> tuple[str, int]:
  if not 0 <= layer < config.num_hidden_layers:
    raise ValueError(f"layer {layer} is not in [0, {config.num_hidden_layers})")
  if layer < config.num_prebuffer_layers:
    return LAYER_GROUPS[0], layer
  return LAYER_GROUPS[1], layer - config.num_prebuffer_layers


def _model_inputs(batch: Mapping[str, Any]) -> dict:
  """The model's arguments from a batch (training batches carry more keys)."""
  keys = ("input_ids", "positions", "segment_ids", "pixels", "pixel_rc", "branch_ids")
  return {k: (jnp.asarray(batch[k]) if batch.get(k) is not None else None) for k in keys}


def _walk(
  params: Mapping, config: NeoConfig, batch: Mapping[str, Any], stop: int
) -> tuple[list[jax.Array], LayerContext]:
  """Hidden states entering layers 0..stop (inclusive of stop) and the shared context."""
  inputs = _model_inputs(batch)
  x, ctx = NeoModel(config).apply({"params": params}, **inputs, method=_embed)
  hidden = [x]
  for layer in range(stop):
    group, index = _group_and_index(config, layer)
    layer_params = jax.tree.map(lambda a, i=index: a[i], params[group])
    x, _ = DecoderLayer(config).apply({"params": layer_params}, x, ctx, None)
    hidden.append(x)
  return hidden, ctx


@functools.partial(jax.jit, static_argnames=("config",))
def layer_inputs(params: Mapping, config: NeoConfig, batch: Mapping[str, Any]) -> list[jax.Array]:
  """[B, L, D] hidden state entering each layer, then the last layer's output (before the
  final norm): num_hidden_layers + 1 arrays."""
  hidden, _ = _walk(params, config, batch, config.num_hidden_layers)
  return hidden


@functools.partial(jax.jit, static_argnames=("config", "layer"))
def attention_call(
  params: Mapping, config: NeoConfig, batch: Mapping[str, Any], layer: int
) -> AttentionCall:
  """The q, k, v, ids and output of `layer`'s attention on `batch` (0-based over all layers,
  pre-Buffer first; `batch` holds the batch contract's arrays)."""
  hidden, ctx = _walk(params, config, batch, layer)
  group, index = _group_and_index(config, layer)
  layer_params = jax.tree.map(lambda a: a[index], params[group])
  with capture_attention() as calls:
    DecoderLayer(config).apply({"params": layer_params}, hidden[layer], ctx, None)
  if len(calls) != 1:
    raise RuntimeError(f"expected one attention call in layer {layer}, recorded {len(calls)}")
  return calls[0]


def attention_probs(
  params: Mapping, config: NeoConfig, batch: Mapping[str, Any], layer: int
) -> jax.Array:
  """float32 [B, H, L, L]: attention probabilities of every query head of `layer` on
  `batch`, [b, h, q, k] = how much query q of row b attends to key k in head h."""
  call = attention_call(params, config, batch, layer)
  return probabilities(call.q, call.k, call.q_ids, call.kv_ids, scale=float(call.scale))
