"""The preference step: ACPO and the DPO family on packed preference rows.

A preference row packs several pairs, each one segment laid out prompt | chosen | rejected with
branch_ids 0 / 1 / 2 (neo_jax/data/packing.py). One forward pass scores both responses: the
attention rule lets each branch see the shared prompt (and its image) but not the other branch,
so the prompt and image are computed once per pair. The packer lists every response token in
`gather_*` [B, K] together with the position whose logits predict it; only those K positions
go through the head, chunked (no [B, L, V] float32 logits), and their log-probs are summed per
(segment, branch) into pair-level log-probs and lengths [B, P], P = K // 2 (every pair has at
least one chosen and one rejected token, so a row holds at most K / 2 pairs).

The reference policy (`config.preference.reference`):

    "model"   a frozen copy of the starting parameters, sharded like the policy, without
              optimizer state. A separate jitted forward (no gradient, micro-batched like the
              step) turns each batch into `ref_chosen_logps` / `ref_rejected_logps` [B, P],
              which the step reads like any batch key. The copy is written once to
              WORKDIR/reference/ when the run starts and read back on resume, so resuming is
              exact even if the initial checkpoint has moved on.
    "batch"   the data already carries those two keys (precomputed reference log-probs).
    "none"    reference-free: reference log-probs are 0 (SimPO ignores them anyway).

The loss is `losses.preference_loss` (the mean over real pairs); state such as the
BCO reward shift rides in TrainState.objective_state. Metrics are TRL's names, logged as
`train/rewards/chosen`, ... (batch means over pairs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from neo_jax import run_dir
from neo_jax.config import NeoConfig
from neo_jax.model import NeoModel, gather_embedding, head_weight
from neo_jax.objectives.cross_entropy import DEFAULT_CHUNK, chunked_token_cross_entropy
from neo_jax.objectives.preference import losses as pl
from neo_jax.parallel.sharding import batch_spec, mesh_context
from neo_jax.trainer import flops
from neo_jax.trainer.objective import LossOutput, Objective, ObjectiveSetup
from neo_jax.trainer.step import split_microbatches

logger = logging.getLogger("neo_jax.train")

REFERENCE_MODES = ("model", "batch", "none")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
GATHER_KEYS = (
  "branch_ids",
  "gather_index",
  "gather_targets",
  "gather_weights",
  "gather_segment",
  "gather_branch",
)


class PairLogps(NamedTuple):
  """Summed response log-probs and lengths per pair, float32 [B, P] each."""

  chosen: jax.Array
  rejected: jax.Array
  chosen_len: jax.Array
  rejected_len: jax.Array

  @property
  def valid(self) -> jax.Array:
    return (self.chosen_len > 0) & (self.rejected_len > 0)


def num_pairs(gather_size: int) -> int:
  """P: the most pairs a row can hold when K response tokens fit (each pair has >= 2)."""
  return max(1, gather_size // 2)


def response_token_logps(
  hidden_bld: jax.Array,
  head_dv: jax.Array,
  batch: Mapping[str, jax.Array],
  *,
  chunk: int = DEFAULT_CHUNK,
  compute_dtype: Any = jnp.float32,
  remat: bool = True,
  vocab_chunk: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log-prob, argmax-correct, mean logit) of every gathered response token, float32 [B, K]
  each.

  Gathers the K predicting positions before the head, so the logits are [B, chunk, V] at a
  time; padding slots (gather_weights == 0) are 0. The mean logit over the vocabulary (what
  TRL's logits/chosen averages) is linear in the head: h . mean_v(W[:, v]), no [B, K, V].
  """
  index_bk = batch["gather_index"]
  hidden_bkd = jnp.take_along_axis(hidden_bld, index_bk[..., None], axis=1)
  ce_bk, correct_bk = chunked_token_cross_entropy(
    hidden_bkd, head_dv, batch["gather_targets"], chunk, compute_dtype, remat, vocab_chunk
  )
  mean_head_d = jax.lax.stop_gradient(head_dv.astype(jnp.float32).mean(axis=1))
  mean_logit_bk = jax.lax.stop_gradient(hidden_bkd).astype(jnp.float32) @ mean_head_d
  real = batch["gather_weights"] != 0
  zero = lambda x: jnp.where(real, x, 0.0)
  return zero(-ce_bk), zero(correct_bk), zero(mean_logit_bk)


def pair_sums(
  values_bk: jax.Array, segment_bk: jax.Array, branch_bk: jax.Array, pairs: int
) -> tuple[jax.Array, jax.Array]:
  """Sums of `values_bk` per (segment, branch): (chosen [B, P], rejected [B, P]).

  Segment s (1..P) is pair s - 1 of its row; slots of segment 0 (padding) or beyond P drop out.
  A per-row scatter-add: no [B, K, P] one-hot (K = 4096 would make it gigabytes).
  """
  segment_bk = jnp.where((segment_bk >= 1) & (segment_bk <= pairs), segment_bk, 0)
  row_sums = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=pairs + 1))
  pick = lambda b: row_sums(jnp.where(branch_bk == b, values_bk, 0.0), segment_bk)[:, 1:]
  return pick(1), pick(2)


def pair_logps(token_logps_bk: jax.Array, batch: Mapping[str, jax.Array], pairs: int) -> PairLogps:
  """Pair-level summed log-probs and response lengths from per-token log-probs."""
  real_bk = (batch["gather_weights"] != 0).astype(jnp.float32)
  seg, br = batch["gather_segment"], batch["gather_branch"]
  chosen, rejected = pair_sums(token_logps_bk, seg, br, pairs)
  chosen_len, rejected_len = pair_sums(real_bk, seg, br, pairs)
  return PairLogps(chosen, rejected, chosen_len, rejected_len)


def sequence_logps(
  model: NeoModel,
  params: Any,
  config: NeoConfig,
  batch: Mapping[str, jax.Array],
  *,
  chunk: int = DEFAULT_CHUNK,
  remat: bool = True,
  vocab_chunk: int = 0,
) -> tuple[PairLogps, dict[str, jax.Array]]:
  """One forward over the packed rows -> pair log-probs, plus token counts for logging."""
  missing = [k for k in GATHER_KEYS if k not in batch]
  if missing:
    raise ValueError(
      f"preference batches need {', '.join(missing)}: set data.kind="
      "'preference' (the packer lays out prompt | chosen | rejected)"
    )
  hidden_bld = model.apply(
    {"params": params},
    batch["input_ids"],
    batch["positions"],
    batch["segment_ids"],
    batch.get("pixels"),
    batch.get("pixel_rc"),
    batch["branch_ids"],
    return_hidden=True,
  )
  logp_bk, correct_bk, logit_bk = response_token_logps(
    hidden_bld,
    head_weight(params, config),
    batch,
    chunk=chunk,
    compute_dtype=jnp.dtype(config.dtype),
    remat=remat,
    vocab_chunk=vocab_chunk,
  )
  pairs = num_pairs(batch["gather_index"].shape[1])
  out = pair_logps(logp_bk, batch, pairs)
  real_bk = batch["gather_weights"] != 0
  chosen_bk = (batch["gather_branch"] == 1) & real_bk
  rejected_bk = (batch["gather_branch"] == 2) & real_bk
  counts = {
    "tokens": (batch["segment_ids"] != 0).sum().astype(jnp.float32),
    "supervised_tokens": chosen_bk.sum().astype(jnp.float32),
    "correct_tokens": jnp.where(chosen_bk, correct_bk, 0.0).sum(),
    "rejected_tokens": rejected_bk.sum().astype(jnp.float32),
    # sums over response tokens; `summarize` divides by the token counts (TRL's token mean)
    "logits_sum/chosen": jnp.where(chosen_bk, logit_bk, 0.0).sum(),
    "logits_sum/rejected": jnp.where(rejected_bk, logit_bk, 0.0).sum(),
    "overflow_pairs": ((batch["gather_segment"] > pairs) & (batch["gather_weights"] != 0))
    .sum()
    .astype(jnp.float32),
  }
  return out, counts


# --- the reference pass -------------------------------------------------------------------------


def _merge_microbatches(x: jax.Array) -> jax.Array:
  """Inverse of step.split_microbatches: [n, B/n, ...] -> [B, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def make_reference_fn(
  config: NeoConfig, *, chunk: int = DEFAULT_CHUNK, micro_batches: int = 1, vocab_chunk: int = 0
) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """(reference params, batch) -> {ref_chosen_logps, ref_rejected_logps} [B, P], no gradient.

  Runs over `micro_batches` slices of the batch in turn (as the step does) to bound memory.
  """
  model = NeoModel(config)

  def one(params, mb):
    pairs, _ = sequence_logps(
      model, params, config, mb, chunk=chunk, remat=False, vocab_chunk=vocab_chunk
    )
    return {"ref_chosen_logps": pairs.chosen, "ref_rejected_logps": pairs.rejected}

  def reference_fn(params, batch):
    params = gather_embedding(params)
    batch = {k: v for k, v in batch.items() if k not in REF_KEYS}
    if micro_batches == 1:
      out = one(params, batch)
    else:
      out = jax.lax.map(lambda mb: one(params, mb), split_microbatches(batch, micro_batches))
      out = {k: _merge_microbatches(v) for k, v in out.items()}
    return jax.lax.stop_gradient(out)

  return reference_fn


# --- the loss the step differentiates -------------------------------------------------------------


def make_preference_loss(
  config: NeoConfig,
  *,
  kind: str,
  hparams: Mapping[str, Any],
  reference: str = "model",
  chunk: int = DEFAULT_CHUNK,
  remat: bool = True,
  vocab_chunk: int = 0,
) -> Callable[[Any, Mapping[str, jax.Array], Any], tuple[LossOutput, Any]]:
  """(params, batch, objective state) -> (LossOutput of sums, new objective state).

  loss_sum is the sum of per-pair losses and weight_sum the number of pairs, so the step's
  loss is the mean over the pairs of the whole batch. Metrics are sums weighted by the pairs
  of each micro-batch (`pairs` holds the count; `summarize` turns them into means).
  """
  if reference not in REFERENCE_MODES:
    raise ValueError(f"preference.reference={reference!r} is not one of {REFERENCE_MODES}")
  check_hparams(kind, hparams)
  model = NeoModel(config)
  uses_reference = pl.loss_kind(kind).uses_reference and reference != "none"

  def loss_fn(params, batch, state):
    pairs, counts = sequence_logps(
      model,
      gather_embedding(params),
      config,
      batch,
      chunk=chunk,
      remat=remat,
      vocab_chunk=vocab_chunk,
    )
    if uses_reference:
      if any(k not in batch for k in REF_KEYS):
        raise ValueError(
          f"preference.reference={reference!r}: the batch has no {' / '.join(REF_KEYS)}"
        )
      ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
      ref_chosen = ref_rejected = jnp.zeros_like(pairs.chosen)
    valid = pairs.valid
    per_pair, metrics, state = pl.preference_loss(
      kind,
      pairs.chosen,
      pairs.rejected,
      ref_chosen,
      ref_rejected,
      pairs.chosen_len,
      pairs.rejected_len,
      state,
      mask=valid,
      **hparams,
    )
    n = valid.sum().astype(jnp.float32)
    sums = {k: v * n for k, v in metrics.items()}
    return LossOutput(per_pair.sum(), n, {**sums, **counts, "pairs": n}), state

  return loss_fn


def check_hparams(kind: str, hparams: Mapping[str, Any]) -> None:
  """Raises now (not inside a jit trace) for an unknown kind, name or value."""
  ones = jnp.ones((2,), jnp.float32)
  pl.preference_loss(kind, -ones, -2 * ones, -ones, -ones, ones, ones, None, **hparams)


def summarize(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The step's sums -> logged values: every `a/b` metric is a per-pair mean, except
  logits/chosen and logits/rejected, means over the response tokens (TRL's: the policy's
  logits averaged over every response token and the vocabulary)."""
  out = {k: float(v) for k, v in metrics.items()}
  pairs = max(out.get("pairs", 0.0), 1.0)
  token_means = {}
  for branch, count in (("chosen", "supervised_tokens"), ("rejected", "rejected_tokens")):
    if f"logits_sum/{branch}" in out:
      token_means[f"logits/{branch}"] = out.pop(f"logits_sum/{branch}") / max(
        out.get(count, 0.0), 1.0
      )
  return {**{k: (v / pairs if "/" in k else v) for k, v in out.items()}, **token_means}


# --- configuration ---------------------------------------------------------------------------


def hparams_from_config(p: ml_collections.ConfigDict) -> dict[str, Any]:
  """The hyperparameters of `p.loss` from config.preference (configs/preference.py)."""
  accepted = pl.hparams(p.loss)
  hp = {name: p[name] for name in accepted if name in p}
  if "alpha_clip" in hp:  # (): no clipping
    hp["alpha_clip"] = tuple(float(x) for x in hp["alpha_clip"]) or None
  if "mpo_weights" in hp:
    hp["mpo_weights"] = tuple(float(x) for x in hp["mpo_weights"])
  if "sft_weight" in hp and hp["sft_weight"] is not None and hp["sft_weight"] < 0:
    hp["sft_weight"] = None  # < 0: the kind's own default (1 for mpo, else 0)
  return hp


# --- the objective ------------------------------------------------------------------------------


def _make_loss(model_config: NeoConfig, config: ml_collections.ConfigDict):
  p = config.preference
  return make_preference_loss(
    model_config,
    kind=p.loss,
    hparams=hparams_from_config(p),
    reference=p.reference,
    chunk=config.loss.chunk_size,
    remat=config.loss.remat,
    vocab_chunk=config.loss.vocab_chunk,
  )


def _init_state(model_config: NeoConfig, config: ml_collections.ConfigDict) -> Any:
  del model_config
  return pl.init_state(config.preference.loss)


def _uses_model_reference(config: ml_collections.ConfigDict) -> bool:
  p = config.preference
  return p.reference == "model" and pl.loss_kind(p.loss).uses_reference


def _step_flops(
  model_config: NeoConfig,
  batch: Mapping[str, np.ndarray],
  trainable: set,
  config: ml_collections.ConfigDict,
) -> float:
  """Policy forward + backward on K head positions, plus the reference forward."""
  counted = flops.step_flops(
    model_config, batch, trainable, int(np.shape(batch["gather_index"])[1])
  )
  return counted["total"] + (counted["forward"] if _uses_model_reference(config) else 0.0)


def reference_params(setup: ObjectiveSetup) -> Any:
  """The frozen reference: saved from the starting parameters, or read back on resume."""
  path = run_dir.path(setup.config.workdir, run_dir.REFERENCE_DIR)
  checkpointer = ocp.StandardCheckpointer()
  try:
    if setup.resuming:
      if not path.is_dir():
        raise FileNotFoundError(
          f"{path}: the run resumes but its reference parameters are "
          "missing (written when the run started)"
        )
      target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        setup.params,
        setup.param_shardings,
      )
      params = checkpointer.restore(path, target)
      logger.info("reference policy read from %s", path)
      return params
    # a copy: the step donates (and overwrites) the state's buffers
    params = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=setup.param_shardings)(
      setup.params
    )
    checkpointer.save(path, params, force=True)
    checkpointer.wait_until_finished()
    logger.info("reference policy: the starting parameters, saved to %s", path)
    return params
  finally:
    checkpointer.close()


def _make_batch_fn(setup: ObjectiveSetup):
  """The reference pass (config.preference.reference == "model"), else None."""
  config = setup.config
  if not _uses_model_reference(config):
    return None
  ref = reference_params(setup)
  mesh = setup.mesh
  fn = make_reference_fn(
    setup.model_config,
    chunk=config.loss.chunk_size,
    micro_batches=config.grad_accum_steps,
    vocab_chunk=config.loss.vocab_chunk,
  )
  out_sharding = NamedSharding(mesh, batch_spec(2))
  jitted = jax.jit(fn, out_shardings={k: out_sharding for k in REF_KEYS})

  def batch_fn(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    with mesh_context(mesh, setup.rules):
      return jitted(ref, dict(batch))

  return batch_fn


OBJECTIVE = Objective(
  "preference",
  _make_loss,
  _step_flops,
  init_state=_init_state,
  make_batch_fn=_make_batch_fn,
  summarize=summarize,
)
