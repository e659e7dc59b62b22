"""Preference losses: ACPO and the DPO family, pure functions of sequence log-probs.

Every loss reads the same arrays for a batch of pairs (any shape, e.g. [B, P] pairs per row):
summed response log-probs of the policy and of the reference for the chosen (w) and rejected
(l) responses, and the response lengths in tokens. With

    rho_w = logp(y_w) - ref_logp(y_w),  rho_l likewise,  r_w = beta * rho_w,  r_l = beta * rho_l

each kind returns a per-pair loss; the objective is their mean over the batch (TRL's
reduction). docs/acpo.md lists them; docs/reference/acpo.md gives each formula and its source.

    per_pair, metrics, state = preference_loss("acpo", chosen, rejected, ref_chosen,
                                               ref_rejected, chosen_len, rejected_len,
                                               state=None, mask=valid, beta=0.1, delta=0.01)

`metrics` are batch means over the valid pairs, named as TRL logs them (rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies with a strict >, logps/chosen,
logps/rejected: means of *summed* log-probs, or of per-token means for the kinds TRL averages,
simpo and ipo) plus each kind's own (acpo/alpha_mean, ...), all without gradient. `state`
carries what a loss keeps between steps (the BCO reward shift); kinds without state pass it
through. Reference and BCO shift are never differentiated; the
ACPO alpha is not unless detach_alpha=False.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
LossResult = tuple[jax.Array, Metrics, Any]

SFT_REDUCTIONS = ("token", "sequence")
ALPHA_MODES = ("per_sample", "batch")


class Pairs(NamedTuple):
  """One batch of pairs; every field has the same shape (float32)."""

  chosen: jax.Array  # summed log-probs of the chosen response under the policy
  rejected: jax.Array
  ref_chosen: jax.Array  # the same under the (frozen) reference; 0 for reference-free kinds
  ref_rejected: jax.Array
  chosen_len: jax.Array  # response tokens
  rejected_len: jax.Array
  mask: jax.Array  # 1 for a real pair, 0 for padding

  @property
  def rho_w(self) -> jax.Array:
    return self.chosen - jax.lax.stop_gradient(self.ref_chosen)

  @property
  def rho_l(self) -> jax.Array:
    return self.rejected - jax.lax.stop_gradient(self.ref_rejected)

  @property
  def count(self) -> jax.Array:
    return self.mask.sum()

  def mean(self, x: jax.Array) -> jax.Array:
    """Mean over the real pairs (0 when there are none)."""
    return jnp.sum(jnp.where(self.mask > 0, x, 0.0)) / jnp.maximum(self.count, 1.0)

  def per_token(self, rho: jax.Array, length: jax.Array) -> jax.Array:
    return rho / jnp.maximum(length, 1.0)  # padding pairs have length 0


def log_sigmoid(x: jax.Array) -> jax.Array:
  return jax.nn.log_sigmoid(x)


# --- the kinds ----------------------------------------------------------------------------------


def _sigmoid(p: Pairs, state, *, beta: float, label_smoothing: float) -> LossResult:
  """DPO; with label_smoothing = eps > 0 conservative DPO (cDPO, TRL <= 0.2x `sigmoid`)."""
  z = beta * (p.rho_w - p.rho_l)
  eps = label_smoothing
  return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z), {}, state


def _robust(p: Pairs, state, *, beta: float, label_smoothing: float) -> LossResult:
  """Robust DPO (Chowdhury et al.): unbiased under label flips with probability eps."""
  z = beta * (p.rho_w - p.rho_l)
  eps = label_smoothing
  if not 0.0 <= eps < 0.5:
    raise ValueError(f"robust: label_smoothing={eps} must be in [0, 0.5)")
  return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps), {}, state


def _hinge(p: Pairs, state, *, beta: float) -> LossResult:
  """RSO / SLiC hinge on the reference-normalised margin (beta = 1 / margin)."""
  return jax.nn.relu(1.0 - beta * (p.rho_w - p.rho_l)), {}, state


def _ipo(p: Pairs, state, *, beta: float) -> LossResult:
  """IPO: squared distance of the per-token log-ratio margin to 1 / (2 beta)."""
  margin = p.per_token(p.rho_w, p.chosen_len) - p.per_token(p.rho_l, p.rejected_len)
  return (margin - 1.0 / (2.0 * beta)) ** 2, {}, state


def _sigmoid_norm(p: Pairs, state, *, beta: float) -> LossResult:
  """Length-normalised DPO: the sigmoid loss on per-token log-ratios."""
  margin = p.per_token(p.rho_w, p.chosen_len) - p.per_token(p.rho_l, p.rejected_len)
  return -log_sigmoid(beta * margin), {}, state


def _simpo(p: Pairs, state, *, beta: float, gamma: float, label_smoothing: float) -> LossResult:
  """SimPO: no reference; mean token log-probs, target margin gamma."""
  margin = p.per_token(p.chosen, p.chosen_len) - p.per_token(p.rejected, p.rejected_len)
  z = beta * margin - gamma
  eps = label_smoothing
  return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z), {}, state


def _dpop(p: Pairs, state, *, beta: float, dpop_lambda: float) -> LossResult:
  """DPO-Positive: penalises the chosen log-prob falling below the reference's."""
  penalty = jax.nn.relu(-p.rho_w)
  z = beta * (p.rho_w - p.rho_l - dpop_lambda * penalty)
  return -log_sigmoid(z), {"dpop/penalty": jax.lax.stop_gradient(p.mean(penalty))}, state


def _nca_pair(p: Pairs, state, *, beta: float) -> LossResult:
  r_w, r_l = beta * p.rho_w, beta * p.rho_l
  return -log_sigmoid(r_w) - 0.5 * log_sigmoid(-r_w) - 0.5 * log_sigmoid(-r_l), {}, state


def _sppo_hard(p: Pairs, state, *, beta: float) -> LossResult:
  target = 1.0 / (2.0 * beta)
  return (p.rho_w - target) ** 2 + (p.rho_l + target) ** 2, {}, state


def _apo_zero(p: Pairs, state, *, beta: float) -> LossResult:
  """APO-zero: raise the chosen, lower the rejected likelihood, each against the reference."""
  return (1.0 - jax.nn.sigmoid(beta * p.rho_w)) + jax.nn.sigmoid(beta * p.rho_l), {}, state


def _apo_down(p: Pairs, state, *, beta: float) -> LossResult:
  """APO-down: lower both, the rejected more (chosen responses worse than the model's)."""
  z = beta * (p.rho_w - p.rho_l)
  return jax.nn.sigmoid(beta * p.rho_w) + (1.0 - jax.nn.sigmoid(z)), {}, state


def _exo_pair(p: Pairs, state, *, beta: float, label_smoothing: float) -> LossResult:
  """EXO (pairwise): reverse KL between the model's and the eps-smoothed label distribution."""
  eps = label_smoothing
  if not 0.0 < eps < 1.0:
    raise ValueError(f"exo_pair: label_smoothing={eps} must be in (0, 1)")
  z = beta * (p.rho_w - p.rho_l)
  loss = jax.nn.sigmoid(z) * (log_sigmoid(z) - math.log(1.0 - eps)) + jax.nn.sigmoid(-z) * (
    log_sigmoid(-z) - math.log(eps)
  )
  return loss, {}, state


def _discopop(p: Pairs, state, *, beta: float, discopop_tau: float) -> LossResult:
  """DiscoPOP: a logistic / exponential blend gated by sigmoid(z / tau)."""
  z = beta * (p.rho_w - p.rho_l)
  m = jax.nn.sigmoid(z / discopop_tau)
  return (1.0 - m) * -log_sigmoid(z) + m * jnp.exp(-z), {}, state


# BCO's reward shift: a count-weighted cumulative mean (TRL's RunningMoments, not an EMA), one
# scalar pushed per call (TRL <= 0.2x `bco_pair`: the batch mean of [r_w, r_l]), updated before
# the loss so the current batch counts.


def init_running_mean() -> dict[str, jax.Array]:
  return {"mean": jnp.zeros((), jnp.float32), "count": jnp.full((), 1e-24, jnp.float32)}


def update_running_mean(
  state: Mapping[str, jax.Array], value: jax.Array, present: jax.Array
) -> dict[str, jax.Array]:
  """Pushes one scalar (when `present`; a batch without pairs leaves the mean alone)."""
  count = state["count"] + 1.0
  mean = state["mean"] + (value - state["mean"]) / count
  keep = lambda new, old: jnp.where(present, new, old).astype(jnp.float32)
  return {"mean": keep(mean, state["mean"]), "count": keep(count, state["count"])}


def _bco_terms(p: Pairs, state, beta: float) -> tuple[jax.Array, jax.Array, Any]:
  r_w, r_l = beta * p.rho_w, beta * p.rho_l
  batch_mean = jax.lax.stop_gradient(0.5 * (p.mean(r_w) + p.mean(r_l)))
  state = update_running_mean(state, batch_mean, p.count > 0)
  delta = jax.lax.stop_gradient(state["mean"])
  return -log_sigmoid(r_w - delta) - log_sigmoid(-(r_l - delta)), delta, state


def _bco_pair(p: Pairs, state, *, beta: float) -> LossResult:
  """BCO-pair with the running-mean reward shift delta (TRL <= 0.2x)."""
  loss, delta, state = _bco_terms(p, state, beta)
  return loss, {"bco/delta": delta}, state


def _mpo(p: Pairs, state, *, beta: float, mpo_weights: tuple[float, float]) -> LossResult:
  """InternVL's MPO preference part: w_p * DPO + w_q * BCO-pair (the SFT part is sft_weight)."""
  w_p, w_q = mpo_weights
  dpo, _, _ = _sigmoid(p, None, beta=beta, label_smoothing=0.0)
  bco, delta, state = _bco_terms(p, state, beta)
  return w_p * dpo + w_q * bco, {"bco/delta": delta}, state


def _acpo(
  p: Pairs,
  state,
  *,
  beta: float,
  delta: float,
  alpha_mode: str,
  alpha_clip: tuple[float, float] | None,
  detach_alpha: bool,
  guard_eps: float,
) -> LossResult:
  """ACPO as reconstructed in docs/reference/acpo.md#acpo-reconstruction (no published equation):

      tau_i = delta * (|y_w| + |y_l|),  tau = mean_i tau_i
      alpha* = (r_w - tau) / r_l        the coefficient with r_w - alpha * r_l = tau
      alpha  = clip(alpha*, alpha_clip), = 1 where |r_l| < guard_eps, detached by default
      loss   = -log sigmoid(r_w - alpha * r_l)

  alpha multiplies only the rejected reward, so the chosen gradient is DPO's and the rejected
  one is alpha times DPO's.
  """
  if alpha_mode not in ALPHA_MODES:
    raise ValueError(f"acpo: alpha_mode={alpha_mode!r} is not one of {ALPHA_MODES}")
  r_w, r_l = beta * p.rho_w, beta * p.rho_l
  tau = p.mean(delta * (p.chosen_len + p.rejected_len))
  if alpha_mode == "per_sample":
    numerator, denominator = r_w - tau, r_l
  else:  # one alpha for the batch, from the batch means of the rewards
    numerator = jnp.broadcast_to(p.mean(r_w) - tau, r_w.shape)
    denominator = jnp.broadcast_to(p.mean(r_l), r_l.shape)
  guard = jnp.abs(denominator) < guard_eps
  alpha_star = numerator / jnp.where(guard, 1.0, denominator)
  if alpha_clip is None:
    low = high = jnp.zeros_like(guard)
    alpha = alpha_star
  else:
    lo, hi = alpha_clip
    low, high = alpha_star < lo, alpha_star > hi
    alpha = jnp.clip(alpha_star, lo, hi)
  alpha = jnp.where(guard, 1.0, alpha)
  if detach_alpha:
    alpha = jax.lax.stop_gradient(alpha)
  # beta * (rho_w - alpha * rho_l) = r_w - alpha * r_l, written so that alpha = 1 rounds
  # exactly like DPO's beta * (rho_w - rho_l)
  scaled_margin = beta * (p.rho_w - alpha * p.rho_l)
  loss = -log_sigmoid(scaled_margin)
  sg = jax.lax.stop_gradient
  share = lambda x: sg(p.mean(x.astype(jnp.float32)))
  low, high = low & ~guard, high & ~guard
  metrics = {
    "acpo/alpha_mean": sg(p.mean(alpha)),
    "acpo/alpha_clip_frac": share(low | high),
    # the distribution of alpha: at the low clip (rejected term off when it is 0), at
    # the high clip (plain DPO when it is 1), solved inside (then the scaled margin is
    # tau exactly and the pair's loss is the constant -log sigmoid(tau)), guarded
    "acpo/alpha_low_frac": share(low),
    "acpo/alpha_high_frac": share(high),
    "acpo/alpha_inside_frac": share(~(low | high | guard)),
    "acpo/guard_frac": share(guard),
    "acpo/tau": sg(tau),
    "acpo/scaled_margin": sg(p.mean(scaled_margin)),
    # how far the policy's summed log-probs moved from the reference's
    "acpo/chosen_drift": sg(p.mean(p.rho_w)),
    "acpo/rejected_drift": sg(p.mean(p.rho_l)),
  }
  return loss, metrics, state


# --- the registry -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossKind:
  """A registered loss: its function, its hyperparameters (with defaults) and its needs."""

  name: str
  fn: Callable[..., LossResult]
  hparams: Mapping[str, Any]
  uses_reference: bool = True  # False: reference log-probs are ignored (SimPO)
  init_state: Callable[[], Any] | None = None  # kinds that carry state between steps
  sft_weight: float = 0.0  # default weight of the NLL on the chosen response
  # TRL scores these kinds by per-token mean log-probs (CPOTrainer's simpo, DPOTrainer's ipo):
  # their logged logps/* are per-token means and rewards/* are beta times them (minus the
  # reference's), so rewards/accuracies follows the loss's own comparison
  average_logps: bool = False
  summary: str = ""


# shared by every kind: beta; an optional SFT / RPO term on the chosen response
COMMON = {"beta": 0.1, "sft_weight": None, "sft_reduction": "token"}

LOSSES: dict[str, LossKind] = {}


def register_loss(kind: LossKind) -> None:
  LOSSES[kind.name] = kind


for _kind in (
  LossKind(
    "sigmoid",
    _sigmoid,
    {"label_smoothing": 0.0},
    summary="DPO: -log s(b D); label_smoothing > 0: cDPO",
  ),
  LossKind(
    "robust",
    _robust,
    {"label_smoothing": 0.0},
    summary="robust DPO: [-(1-e) log s(b D) + e log s(-b D)] / (1 - 2e)",
  ),
  LossKind("hinge", _hinge, {}, summary="max(0, 1 - b D)"),
  LossKind(
    "ipo", _ipo, {}, average_logps=True, summary="(D/|y| - 1/(2b))^2 on per-token log-ratios"
  ),
  LossKind("sigmoid_norm", _sigmoid_norm, {}, summary="-log s(b D/|y|)"),
  LossKind(
    "simpo",
    _simpo,
    {"gamma": 0.5, "label_smoothing": 0.0},
    uses_reference=False,
    average_logps=True,
    summary="-log s(b (logp_w/|y_w| - logp_l/|y_l|) - gamma), no reference",
  ),
  LossKind("dpop", _dpop, {"dpop_lambda": 50.0}, summary="-log s(b (D - lambda max(0, -rho_w)))"),
  LossKind("nca_pair", _nca_pair, {}, summary="-log s(r_w) - log s(-r_w)/2 - log s(-r_l)/2"),
  LossKind("sppo_hard", _sppo_hard, {}, summary="(rho_w - 1/(2b))^2 + (rho_l + 1/(2b))^2"),
  LossKind("apo_zero", _apo_zero, {}, summary="1 - s(r_w) + s(r_l)"),
  LossKind("apo_down", _apo_down, {}, summary="s(r_w) + 1 - s(b D)"),
  LossKind(
    "exo_pair",
    _exo_pair,
    {"label_smoothing": 1e-3},
    summary="reverse KL to the eps-smoothed preference",
  ),
  LossKind(
    "discopop",
    _discopop,
    {"discopop_tau": 0.05},
    summary="(1 - m) (-log s(z)) + m exp(-z), m = s(z / tau)",
  ),
  LossKind(
    "bco_pair",
    _bco_pair,
    {},
    init_state=init_running_mean,
    summary="-log s(r_w - delta) - log s(-(r_l - delta)), delta = running mean",
  ),
  LossKind(
    "mpo",
    _mpo,
    {"mpo_weights": (0.8, 0.2)},
    init_state=init_running_mean,
    sft_weight=1.0,
    summary="0.8 DPO + 0.2 BCO-pair + 1.0 SFT (InternVL MPO)",
  ),
  LossKind(
    "acpo",
    _acpo,
    {
      "delta": 0.01,
      "alpha_mode": "per_sample",
      "alpha_clip": (0.0, 1.0),
      "detach_alpha": True,
      "guard_eps": 1e-6,
    },
    summary="-log s(r_w - alpha r_l), alpha = clip((r_w - tau) / r_l)",
  ),
):
  register_loss(_kind)

# TRL's name for plain DPO
ALIASES = {"dpo": "sigmoid", "cdpo": "sigmoid"}


def loss_kind(kind: str) -> LossKind:
  name = ALIASES.get(kind, kind)
  if name not in LOSSES:
    raise ValueError(f"preference loss {kind!r} is not one of {sorted(set(LOSSES) | set(ALIASES))}")
  return LOSSES[name]


def hparams(kind: str) -> dict[str, Any]:
  """Every hyperparameter `kind` accepts, with its default."""
  return {**COMMON, **loss_kind(kind).hparams}


def init_state(kind: str) -> Any:
  """The state `kind` carries between steps (None for stateless kinds)."""
  k = loss_kind(kind)
  return None if k.init_state is None else k.init_state()


def _sft_term(p: Pairs, reduction: str) -> jax.Array:
  """Per-pair NLL of the chosen response whose batch mean is the SFT loss.

  "token": the token mean over the batch's chosen tokens (TRL's rpo_alpha and InternVL's MPO
  code); "sequence": the mean over pairs of each response's token mean (the MPO paper).
  """
  if reduction == "sequence":
    return -p.chosen / jnp.maximum(p.chosen_len, 1.0)
  if reduction == "token":
    tokens = jnp.sum(jnp.where(p.mask > 0, p.chosen_len, 0.0))
    return -p.chosen * p.count / jnp.maximum(tokens, 1.0)
  raise ValueError(f"sft_reduction={reduction!r} is not one of {SFT_REDUCTIONS}")


def preference_loss(
  kind: str,
  chosen_logps: jax.Array,
  rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array,
  ref_rejected_logps: jax.Array,
  chosen_len: jax.Array,
  rejected_len: jax.Array,
  state: Any = None,
  *,
  mask: jax.Array | None = None,
  **hp: Any,
) -> LossResult:
  """(per-pair loss, batch-mean metrics, new state) of one batch of pairs.

  All arrays share one shape; `mask` marks real pairs (default: all), whose loss the caller
  averages; padding pairs get loss 0. Unknown hyperparameters are an error (typos).
  """
  k = loss_kind(kind)
  allowed = hparams(kind)
  unknown = sorted(set(hp) - set(allowed))
  if unknown:
    raise ValueError(
      f"preference loss {kind!r}: unknown hyperparameters {unknown} (accepted: {sorted(allowed)})"
    )
  hp = {**allowed, **hp}
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  shape = jnp.shape(chosen_logps)
  mask = jnp.ones(shape, jnp.float32) if mask is None else f32(mask)
  if not k.uses_reference:
    ref_chosen_logps = ref_rejected_logps = jnp.zeros(shape, jnp.float32)
  p = Pairs(
    f32(chosen_logps),
    f32(rejected_logps),
    f32(ref_chosen_logps),
    f32(ref_rejected_logps),
    f32(chosen_len),
    f32(rejected_len),
    mask,
  )
  if k.init_state is not None and state is None:
    state = k.init_state()
  beta = hp.pop("beta")
  sft_weight = hp.pop("sft_weight")
  sft_weight = k.sft_weight if sft_weight is None else sft_weight
  sft_reduction = hp.pop("sft_reduction")
  loss, extra, new_state = k.fn(p, state, beta=beta, **hp)
  if sft_weight:
    loss = loss + sft_weight * _sft_term(p, sft_reduction)
  loss = jnp.where(mask > 0, loss, 0.0)

  sg = jax.lax.stop_gradient
  if k.average_logps:
    logp_w, logp_l = p.per_token(p.chosen, p.chosen_len), p.per_token(p.rejected, p.rejected_len)
    rho_w, rho_l = p.per_token(p.rho_w, p.chosen_len), p.per_token(p.rho_l, p.rejected_len)
  else:
    logp_w, logp_l, rho_w, rho_l = p.chosen, p.rejected, p.rho_w, p.rho_l
  r_w, r_l = sg(beta * rho_w), sg(beta * rho_l)
  metrics = {
    "rewards/chosen": p.mean(r_w),
    "rewards/rejected": p.mean(r_l),
    "rewards/margins": p.mean(r_w - r_l),
    "rewards/accuracies": p.mean((r_w > r_l).astype(jnp.float32)),
    "logps/chosen": p.mean(sg(logp_w)),
    "logps/rejected": p.mean(sg(logp_l)),
    **extra,
  }
  if sft_weight:
    metrics["sft/nll"] = sg(p.mean(_sft_term(p, sft_reduction)))
  return loss, metrics, new_state
