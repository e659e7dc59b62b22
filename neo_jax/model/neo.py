"""The NEO model: embed, place visual tokens, pre-Buffer, post-LLM, norm, head.

Parameter tree (names mirror the HF checkpoint; `neo_jax.convert.mapping` is the table):

    vision/patch_embedding/{kernel, bias}     16-px patch linear, 768 -> C
    vision/dense_embedding/{kernel, bias}     2x2 merge, 4*C -> hidden
    embed_tokens/embedding                    [vocab, hidden]
    pre_buffer/<layer>                        layers [0, E), stacked on a leading axis
    llm/<layer>                               layers [E, num_hidden_layers), stacked
    norm/scale
    lm_head/kernel                            [hidden, vocab], absent when tied

Training stages select parameters by these paths (`pre_buffer/...`, `.../q_proj_hw/...`).
Layers of each group run under `nn.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from neo_jax.config import NeoConfig
from neo_jax.model.attention import LayerCache, NativeAttention, RopeTables
from neo_jax.model.layers import DEFAULT_INIT, EMBED_ACTIVATION, MLP, Linear, RMSNorm, dtype_of
from neo_jax.model.rope import rotate_half_cos_sin
from neo_jax.model.vision import PatchEmbedding
from neo_jax.ops import flash_common
from neo_jax.ops.masks import AttnIds
from neo_jax.positions import image_ids as compute_image_ids

LAYER_GROUPS = ("pre_buffer", "llm")

# What a layer keeps for its backward pass ("none": everything, no remat). "dots_attention"
# keeps the matmul outputs and the flash kernels' output and logsumexp, and recomputes only
# norms, RoPE and the MLP's activation: on 2 CPU cores it cut the 177.5M NEO's step memory at
# L = 2,048 by 0.43 GiB at the same speed (benchmarks/README.md). With `xla`/`xla_chunked`/
# `cudnn` attention, which have no such names, it recomputes attention like "dots_no_batch".
REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "dots_attention": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(*flash_common.SAVED_NAMES),
  ),
}


class KVCache(NamedTuple):
  """Decoding state: per-group stacked layer caches and the ids of every cache slot."""

  layers: dict  # group name -> LayerCache with a leading layer axis
  segment_ids: jax.Array  # [B, S]; 0 = empty slot or padding
  image_ids: jax.Array  # [B, S]
  index: jax.Array  # int32 scalar: the slot the next token is written to


class LayerContext(NamedTuple):
  """What every layer shares: rope tables, mask ids and where to write the cache."""

  rope: RopeTables
  q_ids: AttnIds
  kv_ids: AttnIds | None
  cache_index: jax.Array | None


class DecoderLayer(nn.Module):
  """Pre-norm Qwen3 block with Native Attention; identical for pre-Buffer and post-LLM."""

  config: NeoConfig

  @nn.compact
  def __call__(
    self, x_bld: jax.Array, ctx: LayerContext, cache: LayerCache | None
  ) -> tuple[jax.Array, LayerCache | None]:
    cfg = self.config
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    x_bld = nn.with_logical_constraint(x_bld, EMBED_ACTIVATION)
    h = RMSNorm(cfg.rms_norm_eps, param_dtype, name="input_layernorm")(x_bld)
    attn, new_cache = NativeAttention(cfg, name="self_attn")(
      h, ctx.rope, ctx.q_ids, ctx.kv_ids, cache, ctx.cache_index
    )
    x_bld = x_bld + attn
    h = RMSNorm(cfg.rms_norm_eps, param_dtype, name="post_attention_layernorm")(x_bld)
    x_bld = x_bld + MLP(cfg.intermediate_size, dtype, param_dtype, name="mlp")(h)
    return x_bld, new_cache


def _layer_stack(config: NeoConfig, length: int, name: str) -> nn.Module:
  layer = DecoderLayer
  if config.remat_policy != "none":
    layer = nn.remat(layer, policy=REMAT_POLICIES[config.remat_policy], prevent_cse=False)
  scanned = nn.scan(
    layer,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=(nn.broadcast, 0),
    length=length,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scanned(config, name=name)


def rope_tables(positions_b3l: jax.Array, config: NeoConfig) -> RopeTables:
  dtype = dtype_of(config.dtype)
  t, h, w = positions_b3l[:, 0], positions_b3l[:, 1], positions_b3l[:, 2]
  cos_t, sin_t = rotate_half_cos_sin(t, config.head_dim, config.rope_theta, dtype)
  cos_h, sin_h = rotate_half_cos_sin(h, config.hw_head_dim, config.rope_theta_hw, dtype)
  cos_w, sin_w = rotate_half_cos_sin(w, config.hw_head_dim, config.rope_theta_hw, dtype)
  return RopeTables(cos_t, sin_t, cos_h, sin_h, cos_w, sin_w)


def place_visual_tokens(
  text_bld: jax.Array, visual_bnd: jax.Array, input_ids: jax.Array, img_context_id: int
) -> jax.Array:
  """The k-th `<IMG_CONTEXT>` token of each row takes visual token k of that row."""
  is_ctx = input_ids == img_context_id
  index = jnp.clip(jnp.cumsum(is_ctx, axis=-1) - 1, 0, visual_bnd.shape[1] - 1)
  gathered = jnp.take_along_axis(visual_bnd, index[..., None], axis=1)
  return jnp.where(is_ctx[..., None], gathered.astype(text_bld.dtype), text_bld)


class NeoModel(nn.Module):
  config: NeoConfig

  def setup(self):
    cfg = self.config
    param_dtype = dtype_of(cfg.param_dtype)
    self.vision = PatchEmbedding(cfg)
    self.embed_tokens = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      param_dtype=param_dtype,
      embedding_init=nn.with_logical_partitioning(DEFAULT_INIT, ("vocab", "embed")),
    )
    self.groups = {
      name: _layer_stack(cfg, n, name)
      for name, n in zip(LAYER_GROUPS, (cfg.num_prebuffer_layers, cfg.num_llm_layers))
      if n > 0
    }
    self.norm = RMSNorm(cfg.rms_norm_eps, param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = Linear(
        cfg.vocab_size,
        ("embed", "vocab"),
        dtype=dtype_of(cfg.dtype),
        param_dtype=param_dtype,
        out_dtype=jnp.float32,
      )

  def __call__(
    self,
    input_ids: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    pixels: jax.Array | None = None,
    pixel_rc: jax.Array | None = None,
    branch_ids: jax.Array | None = None,
    *,
    cache: KVCache | None = None,
    return_hidden: bool = False,
  ) -> Any:
    """Logits float32 [B, L, V] (or final hidden [B, L, D] with `return_hidden`).

    Args follow the batch contract (docs/architecture.md#the-batch-contract-between-data-and-model):
    input_ids/segment_ids/branch_ids [B, L], positions [B, 3, L] (T, H, W), pixels [B, N, 4, 768]
    (uint8 or normalised float), pixel_rc [B, N, 2]. With `cache`, the L tokens are written at
    `cache.index` and attend to every filled slot; the call then returns (output, new_cache).
    """
    cfg = self.config
    dtype = dtype_of(cfg.dtype)
    x = self.embed_tokens(input_ids).astype(dtype)
    if pixels is not None:
      visual = self.vision(pixels, pixel_rc)
      x = place_visual_tokens(x, visual, input_ids, cfg.img_context_token_id)
    x = nn.with_logical_constraint(x, EMBED_ACTIVATION)

    img_ids = compute_image_ids(input_ids, positions[:, 0], cfg.img_context_token_id)
    q_ids = AttnIds(
      segment_ids.astype(jnp.int32),
      img_ids,
      None if branch_ids is None else branch_ids.astype(jnp.int32),
      None,
    )
    kv_ids, cache_index = None, None
    if cache is not None:
      cache_index = cache.index
      slots = cache_index + jnp.arange(input_ids.shape[1], dtype=jnp.int32)
      q_ids = q_ids._replace(positions=jnp.broadcast_to(slots, input_ids.shape))
      write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, cache_index, axis=1)
      kv_ids = AttnIds(
        write(cache.segment_ids, q_ids.segment_ids), write(cache.image_ids, img_ids), None, None
      )
    ctx = LayerContext(rope_tables(positions, cfg), q_ids, kv_ids, cache_index)

    new_layers = {}
    for name, stack in self.groups.items():
      x, new_layers[name] = stack(x, ctx, None if cache is None else cache.layers[name])
    x = self.norm(x)
    out = x if return_hidden else self.logits(x)
    if cache is None:
      return out
    new_cache = KVCache(
      new_layers, kv_ids.segment_ids, kv_ids.image_ids, cache_index + input_ids.shape[1]
    )
    return out, new_cache

  def logits(self, hidden_bld: jax.Array) -> jax.Array:
    """float32 logits of final hidden states."""
    if not self.config.tie_word_embeddings:
      return self.lm_head(hidden_bld)
    weight_vd = self.embed_tokens.embedding.astype(hidden_bld.dtype)
    return jnp.einsum("bld,vd->blv", hidden_bld, weight_vd, preferred_element_type=jnp.float32)


def head_weight(params: dict, config: NeoConfig) -> jax.Array:
  """[hidden, vocab] output projection from a parameter tree (tied or not)."""
  if config.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def gather_embedding(params: dict) -> dict:
  """`params` with the token embedding constrained whole along `embed` (split over `vocab` only).

  FSDP gathers every weight before use; for the embedding lookup saying so explicitly lets the
  partitioner produce batch-sharded activations without a full rematerialisation. Losses apply
  it to the parameters before calling the model.
  """
  emb = nn.with_logical_constraint(params["embed_tokens"]["embedding"], ("vocab", None))
  return {**params, "embed_tokens": {**params["embed_tokens"], "embedding": emb}}


def init_cache(config: NeoConfig, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
  """An empty cache of `max_len` slots (static, so decoding compiles once)."""
  dt = dtype_of(dtype or config.dtype)
  nkv = config.num_key_value_heads
  layers = {}
  for name, n in zip(LAYER_GROUPS, (config.num_prebuffer_layers, config.num_llm_layers)):
    if n > 0:
      layers[name] = LayerCache(
        jnp.zeros((n, batch, max_len, nkv, config.qk_head_dim), dt),
        jnp.zeros((n, batch, max_len, nkv, config.head_dim), dt),
      )
  zeros = jnp.zeros((batch, max_len), jnp.int32)
  return KVCache(layers, zeros, zeros, jnp.zeros((), jnp.int32))
