"""Next-token prediction: NEO's weighted cross-entropy on packed batches (pretrain, midtrain,
SFT). The loss reads the batch contract's `targets` and `loss_weights` (NEO's square weights
come from the packer) and computes the head chunk by chunk (neo_jax/objectives/cross_entropy.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.model import NeoModel, gather_embedding, head_weight
from neo_jax.objectives.cross_entropy import DEFAULT_CHUNK, weighted_next_token_loss
from neo_jax.trainer import flops
from neo_jax.trainer.objective import LossFn, Objective


def next_token_loss(
  config: NeoConfig,
  *,
  chunk: int = DEFAULT_CHUNK,
  positions_per_row: int = 0,
  remat: bool = True,
  vocab_chunk: int = 0,
  fused: bool = True,
) -> LossFn:
  """Weighted next-token cross-entropy of NEO on a packed batch (the batch contract)."""
  model = NeoModel(config)

  def loss_fn(params, batch):
    params = gather_embedding(params)
    hidden_bld = model.apply(
      {"params": params},
      batch["input_ids"],
      batch["positions"],
      batch["segment_ids"],
      batch.get("pixels"),
      batch.get("pixel_rc"),
      return_hidden=True,
    )
    out = weighted_next_token_loss(
      hidden_bld,
      head_weight(params, config),
      batch["targets"],
      batch["loss_weights"],
      chunk=chunk,
      positions_per_row=positions_per_row,
      compute_dtype=jnp.dtype(config.dtype),
      remat=remat,
      vocab_chunk=vocab_chunk,
      fused=fused,
    )
    out.metrics["tokens"] = (batch["segment_ids"] != 0).sum().astype(jnp.float32)
    return out

  return loss_fn


def _make_loss(model_config: NeoConfig, config: ml_collections.ConfigDict) -> LossFn:
  return next_token_loss(
    model_config,
    chunk=config.loss.chunk_size,
    positions_per_row=config.loss.positions_per_row,
    remat=config.loss.remat,
    vocab_chunk=config.loss.vocab_chunk,
  )


def _step_flops(
  model_config: NeoConfig,
  batch: Mapping[str, np.ndarray],
  trainable: set,
  config: ml_collections.ConfigDict,
) -> float:
  return flops.step_flops(model_config, batch, trainable, config.loss.positions_per_row)["total"]


OBJECTIVE = Objective("next_token", _make_loss, _step_flops)
