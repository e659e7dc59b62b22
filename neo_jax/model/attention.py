"""Multi-Head Native Attention.

Per head, the query and key have three sub-heads: T (head_dim, from q_proj / k_proj, rotated
by the T index with theta_T) and H and W (head_dim/2 each, from q_proj_hw / k_proj_hw whose
per-head rows are [H | W], rotated by the row and column index with theta_HW). Each sub-head
has its own RMSNorm, applied before its RoPE. The three are concatenated to a 2*head_dim
query/key; values stay head_dim wide; the scale is 1/sqrt(head_dim).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from neo_jax.config import NeoConfig
from neo_jax.model.layers import Linear, RMSNorm, dtype_of
from neo_jax.model.rope import apply_rotate_half
from neo_jax.ops.attention import attention
from neo_jax.ops.masks import AttnIds

# logical names of q, k, v and the attention output [B, L, heads, width]
Q_ACTIVATION = ("activation_batch", "activation_length", "activation_heads", "activation_qk")
K_ACTIVATION = ("activation_batch", "activation_length", "activation_kv_heads", "activation_qk")
V_ACTIVATION = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")
OUT_ACTIVATION = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


class RopeTables(NamedTuple):
  """cos/sin of the T, H and W rotations, each [B, L, D], computed once per forward pass."""

  cos_t: jax.Array
  sin_t: jax.Array
  cos_h: jax.Array
  sin_h: jax.Array
  cos_w: jax.Array
  sin_w: jax.Array


class LayerCache(NamedTuple):
  """One layer's KV cache: post-RoPE keys [B, S, Hkv, 2*head_dim], values [B, S, Hkv, head_dim]."""

  k: jax.Array
  v: jax.Array


class NativeAttention(nn.Module):
  config: NeoConfig

  @nn.compact
  def __call__(
    self,
    x_bld: jax.Array,
    rope: RopeTables,
    q_ids: AttnIds,
    kv_ids: AttnIds | None = None,
    cache: LayerCache | None = None,
    cache_index: jax.Array | None = None,
  ) -> tuple[jax.Array, LayerCache | None]:
    cfg = self.config
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    b, l, _ = x_bld.shape
    nh, nkv, d, dhw = (
      cfg.num_attention_heads,
      cfg.num_key_value_heads,
      cfg.head_dim,
      cfg.hw_head_dim,
    )

    def proj(features, axes, name):
      return Linear(features, axes, dtype=dtype, param_dtype=param_dtype, name=name)(x_bld)

    def norm(name):
      return RMSNorm(cfg.rms_norm_eps, param_dtype, name=name)

    q_t = proj(nh * d, ("embed", "q_heads"), "q_proj").reshape(b, l, nh, d)
    k_t = proj(nkv * d, ("embed", "kv_heads"), "k_proj").reshape(b, l, nkv, d)
    v = proj(nkv * d, ("embed", "kv_heads"), "v_proj").reshape(b, l, nkv, d)
    q_hw = proj(nh * d, ("embed", "q_heads"), "q_proj_hw").reshape(b, l, nh, d)
    k_hw = proj(nkv * d, ("embed", "kv_heads"), "k_proj_hw").reshape(b, l, nkv, d)

    def sub_heads(t, hw, prefix):
      t = apply_rotate_half(norm(f"{prefix}_norm")(t), rope.cos_t, rope.sin_t)
      h = apply_rotate_half(norm(f"{prefix}_norm_h")(hw[..., :dhw]), rope.cos_h, rope.sin_h)
      w = apply_rotate_half(norm(f"{prefix}_norm_w")(hw[..., dhw:]), rope.cos_w, rope.sin_w)
      return jnp.concatenate([t, h, w], axis=-1)

    q = nn.with_logical_constraint(sub_heads(q_t, q_hw, "q"), Q_ACTIVATION)
    k = nn.with_logical_constraint(sub_heads(k_t, k_hw, "k"), K_ACTIVATION)
    v = nn.with_logical_constraint(v, V_ACTIVATION)

    new_cache = None
    if cache is not None:
      write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
        buf, new.astype(buf.dtype), cache_index, axis=1
      )
      new_cache = LayerCache(write(cache.k, k), write(cache.v, v))
      k, v = new_cache.k.astype(dtype), new_cache.v.astype(dtype)

    with jax.named_scope("attention_op"):  # a name for profiles (benchmarks/profile_step.py)
      out = attention(
        q,
        k,
        v,
        q_ids,
        kv_ids,
        impl=cfg.attention_impl,
        scale=d**-0.5,
        q_chunk=cfg.attention_q_chunk,
        platform=cfg.platform or None,
      )
    out = nn.with_logical_constraint(out, OUT_ACTIVATION)
    out = Linear(
      cfg.hidden_size, ("q_heads", "embed"), dtype=dtype, param_dtype=param_dtype, name="o_proj"
    )(out.reshape(b, l, nh * d))
    return out, new_cache
