"""Step FLOPs of NEO: the model behind MFU.

The FLOP model (docs/training.md has the derivation) counts every matmul of a step from the
batch itself: per real (non-padding) token the Q, K, V, O, Q_hw, K_hw projections and the
SwiGLU MLP of every layer; per allowed (query, key) pair of the attention mask, counted
exactly from the batch ids, the QK (2 * head_dim wide) and PV products of every query head;
per visual token the 16-px patch linear (4 patches) and the 2x2 merge; per loss position
the LM head. Forward = 2 FLOPs per multiply-add. Backward = the input gradients of everything
above the first trainable parameter (1x forward) plus the weight gradients of trainable
parameters only (1x forward each), so a frozen LLM is not credited with weight gradients.
Rematerialisation is not counted (these are model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.ops import masks
from neo_jax.positions import image_ids

# Dense bf16 peak FLOP/s per device (vendor figures), matched against jax device_kind.
PEAK_FLOPS = (
  ("TPU v6", 918e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v4", 275e12),
  ("H200", 989e12),
  ("H100", 989e12),
  ("A100", 312e12),
  ("B200", 2250e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """Vendor peak for a jax `device_kind`, or None (e.g. CPU) when unknown."""
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


# --- attention density ------------------------------------------------------------------------

_kv_ranges = jax.jit(masks.kv_ranges)


def _host_device() -> jax.Device:
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # the CPU backend is not initialised (JAX_PLATFORMS names others only)
    return jax.local_devices()[0]


def attention_pairs(
  segment_ids: np.ndarray, image_ids_: np.ndarray, branch_ids: np.ndarray | None = None
) -> np.ndarray:
  """Number of allowed (query, key) pairs of each row under the NEO mask rule, int64 [B].

  The rule's interval form (`neo_jax.ops.masks.kv_ranges`, what the kernels evaluate): O(L)
  per row, computed on the host's CPU and summed in int64.
  """
  with jax.default_device(_host_device()):
    ids = masks.self_attention_ids(
      jnp.asarray(np.atleast_2d(segment_ids)),
      jnp.asarray(np.atleast_2d(image_ids_)),
      None if branch_ids is None else jnp.asarray(np.atleast_2d(branch_ids)),
    )
    ranges = np.asarray(_kv_ranges(ids), np.int64)
  return masks.num_allowed(ranges)


# --- the FLOP model ---------------------------------------------------------------------------


def _trainable(trainable: set[str] | None, path: str) -> bool:
  return trainable is None or path in trainable


def layer_matmuls(config: NeoConfig) -> dict[str, tuple[int, int]]:
  """Parameter path in a decoder layer -> (in, out) of its per-token matmul."""
  d_model, f = config.hidden_size, config.intermediate_size
  nh, nkv, dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  return {
    "self_attn/q_proj": (d_model, nh * dh),
    "self_attn/k_proj": (d_model, nkv * dh),
    "self_attn/v_proj": (d_model, nkv * dh),
    "self_attn/q_proj_hw": (d_model, nh * dh),
    "self_attn/k_proj_hw": (d_model, nkv * dh),
    "self_attn/o_proj": (nh * dh, d_model),
    "mlp/gate_proj": (d_model, f),
    "mlp/up_proj": (d_model, f),
    "mlp/down_proj": (f, d_model),
  }


def step_flops(
  config: NeoConfig,
  batch: Mapping[str, np.ndarray],
  trainable: set[str] | None = None,
  loss_positions_per_row: int = 0,
) -> dict[str, float]:
  """Model FLOPs of one training step on `batch` (global, numpy): forward, backward, total.

  `trainable` is the set of trainable parameter paths (None: all);
  `loss_positions_per_row` is K of the loss (0: the head runs on all L positions).
  """
  cfg = config
  ids = np.asarray(batch["input_ids"])
  seg = np.asarray(batch["segment_ids"])
  tokens = float((seg != 0).sum())
  n_visual = float(((ids == cfg.img_context_token_id) & (seg != 0)).sum())
  img = image_ids(ids, np.asarray(batch["positions"])[:, 0], cfg.img_context_token_id)
  pairs = float(attention_pairs(seg, img, batch.get("branch_ids")).sum())
  b, l = ids.shape
  head_positions = float(b * (loss_positions_per_row if loss_positions_per_row > 0 else l))

  d_model = cfg.hidden_size
  nh, dh = cfg.num_attention_heads, cfg.head_dim
  fwd = bwd = 0.0
  groups = (("pre_buffer", cfg.num_prebuffer_layers), ("llm", cfg.num_llm_layers))
  for group, n_layers in groups:
    for name, (i, o) in layer_matmuls(cfg).items():
      flops = 2.0 * i * o * tokens * n_layers
      fwd += flops
      bwd += flops * (1 + _trainable(trainable, f"{group}/{name}/kernel"))
  attn = 2.0 * (cfg.qk_head_dim + dh) * nh * pairs * cfg.num_hidden_layers
  fwd += attn
  bwd += 2 * attn

  c, sub = cfg.vision_hidden_size, cfg.merge_size**2
  patch = 2.0 * cfg.patch_dim * c * sub * n_visual
  merge = 2.0 * sub * c * d_model * n_visual
  fwd += patch + merge
  bwd += patch * _trainable(trainable, "vision/patch_embedding/kernel")  # no grad for pixels
  bwd += merge * (1 + _trainable(trainable, "vision/dense_embedding/kernel"))

  head = 2.0 * d_model * cfg.vocab_size * head_positions
  head_path = "embed_tokens/embedding" if cfg.tie_word_embeddings else "lm_head/kernel"
  fwd += head
  bwd += head * (1 + _trainable(trainable, head_path))
  return {
    "forward": fwd,
    "backward": bwd,
    "total": fwd + bwd,
    "tokens": tokens,
    "visual_tokens": n_visual,
    "attention_pairs": pairs,
    "attention_density": pairs / max(1.0, b * l * (l + 1) / 2),
  }


def params_flops_per_token(config: NeoConfig) -> float:
  """6N-style reference: 6 x matmul parameters per token (no attention, all trainable)."""
  per_layer = (
    config.hidden_size
    * config.head_dim
    * (3 * config.num_attention_heads + 3 * config.num_key_value_heads)
    + 3 * config.hidden_size * config.intermediate_size
  )
  return 6.0 * (per_layer * config.num_hidden_layers + config.hidden_size * config.vocab_size)
