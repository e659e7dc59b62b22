"""Step FLOPs of NEO (the MFU model), and metric writers (JSONL + TensorBoard).

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

import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from neo_jax.config import NeoConfig
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


def peak_flops_per_device(device_kind: str) -> Optional[float]:
  """Vendor peak for a jax `device_kind`, or None (e.g. CPU) when unknown."""
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


# --- attention density ------------------------------------------------------------------------

def _segment_cumsum(values_l: np.ndarray, segment_l: np.ndarray) -> np.ndarray:
  total = np.cumsum(values_l)
  start = np.ones_like(segment_l, dtype=bool)
  start[1:] = segment_l[1:] != segment_l[:-1]
  offset = np.maximum.accumulate(np.where(start, total - values_l, 0))
  return total - offset


def attention_pairs(segment_ids: np.ndarray, image_ids_: np.ndarray,
                    branch_ids: Optional[np.ndarray] = None) -> np.ndarray:
  """Number of allowed (query, key) pairs of each row under the NEO mask rule, int64 [B].

  O(L) per row: causal pairs within a segment (keys of the shared prompt or of the query's
  own branch), plus the pairs an image adds by seeing itself bidirectionally.
  """
  segment_ids = np.atleast_2d(segment_ids)
  image_ids_ = np.atleast_2d(image_ids_)
  branch_ids = np.zeros_like(segment_ids) if branch_ids is None else np.atleast_2d(branch_ids)
  out = np.zeros(segment_ids.shape[0], np.int64)
  for b in range(segment_ids.shape[0]):
    seg, img, br = segment_ids[b], image_ids_[b], branch_ids[b]
    valid = seg != 0
    shared = _segment_cumsum((br == 0).astype(np.int64), seg)
    visible = shared.copy()
    for branch in np.unique(br[br != 0]):
      own = _segment_cumsum((br == branch).astype(np.int64), seg)
      visible = np.where(br == branch, shared + own, visible)
    total = int(visible[valid].sum())
    # each image (a run of equal non-zero ids in one segment) adds its upper triangle
    run_start = np.ones_like(seg, dtype=bool)
    run_start[1:] = (img[1:] != img[:-1]) | (seg[1:] != seg[:-1])
    run_id = np.cumsum(run_start)
    in_image = (img != 0) & valid
    if in_image.any():
      sizes = np.bincount(run_id[in_image]).astype(np.int64)
      total += int((sizes * (sizes - 1) // 2).sum())
    out[b] = total
  return out


# --- the FLOP model ---------------------------------------------------------------------------

def _trainable(trainable: Optional[set[str]], path: str) -> bool:
  return trainable is None or path in trainable


def step_flops(config: NeoConfig, batch: Mapping[str, np.ndarray],
               trainable: Optional[set[str]] = None,
               loss_positions_per_row: int = 0) -> dict[str, float]:
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

  d_model, f = cfg.hidden_size, cfg.intermediate_size
  nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  matmuls = {  # name -> (in, out) of a per-token matmul in every layer
      "self_attn/q_proj": (d_model, nh * dh), "self_attn/k_proj": (d_model, nkv * dh),
      "self_attn/v_proj": (d_model, nkv * dh), "self_attn/q_proj_hw": (d_model, nh * dh),
      "self_attn/k_proj_hw": (d_model, nkv * dh), "self_attn/o_proj": (nh * dh, d_model),
      "mlp/gate_proj": (d_model, f), "mlp/up_proj": (d_model, f), "mlp/down_proj": (f, d_model),
  }
  fwd = bwd = 0.0
  groups = (("pre_buffer", cfg.num_prebuffer_layers), ("llm", cfg.num_llm_layers))
  for group, n_layers in groups:
    for name, (i, o) in matmuls.items():
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
  return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "tokens": tokens,
          "visual_tokens": n_visual, "attention_pairs": pairs,
          "attention_density": pairs / max(1.0, b * l * (l + 1) / 2)}


def params_flops_per_token(config: NeoConfig) -> float:
  """6N-style reference: 6 x matmul parameters per token (no attention, all trainable)."""
  per_layer = (config.hidden_size * config.head_dim *
               (3 * config.num_attention_heads + 3 * config.num_key_value_heads)
               + 3 * config.hidden_size * config.intermediate_size)
  return 6.0 * (per_layer * config.num_hidden_layers + config.hidden_size * config.vocab_size)


# --- writers ----------------------------------------------------------------------------------

class MetricWriter:
  """Scalars to WORKDIR/metrics.jsonl and TensorBoard event files (no TensorFlow needed)."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboard.summary import Writer
      self._tb = Writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _number(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in clean.items():
        if value is not None and math.isfinite(value):
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _number(value: Any) -> Optional[float]:
  """A float (NaN / Inf kept: JSONL writes them as NaN / Infinity, TensorBoard skips them)."""
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError):
    return None


def read_jsonl(path: str) -> list[dict]:
  """All records of a metrics.jsonl (for tests, notebooks and the demo report)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
