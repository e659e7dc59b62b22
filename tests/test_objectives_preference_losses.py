"""Preference losses (neo_jax/objectives/preference/losses.py) against values computed by hand.

Every expected value below is recomputed from the formulas of docs/reference/acpo.md
(#acpo-reconstruction, #dpo-family-losses, #mpo) with Python's math module on plain floats,
independently of the jax code under test.
"""

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.objectives.preference import losses as pl

BETA = 0.1
LN2 = math.log(2.0)

# three pairs: summed log-probs of policy and reference, response lengths
CHOSEN = [-10.0, -4.0, -7.5]
REJECTED = [-12.0, -3.0, -9.0]
REF_CHOSEN = [-11.0, -5.0, -7.0]
REF_REJECTED = [-11.5, -4.5, -6.0]
CHOSEN_LEN = [4.0, 2.0, 3.0]
REJECTED_LEN = [5.0, 2.0, 6.0]


def ls(x):  # log sigmoid
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
  return 1.0 / (1.0 + math.exp(-x))


def rhos(i):
  return CHOSEN[i] - REF_CHOSEN[i], REJECTED[i] - REF_REJECTED[i]


def run(
  kind,
  chosen=CHOSEN,
  rejected=REJECTED,
  ref_chosen=REF_CHOSEN,
  ref_rejected=REF_REJECTED,
  chosen_len=CHOSEN_LEN,
  rejected_len=REJECTED_LEN,
  state=None,
  **hp,
):
  arr = lambda x: jnp.asarray(x, jnp.float32)
  return pl.preference_loss(
    kind,
    arr(chosen),
    arr(rejected),
    arr(ref_chosen),
    arr(ref_rejected),
    arr(chosen_len),
    arr(rejected_len),
    state,
    beta=BETA,
    **hp,
  )


def hand(kind, **hp):
  """Per-pair losses of `kind` from docs/reference/acpo.md#dpo-family-losses, on plain floats."""
  out = []
  for i in range(len(CHOSEN)):
    rw, rl = rhos(i)
    d = rw - rl
    z = BETA * d
    lw, ll = CHOSEN_LEN[i], REJECTED_LEN[i]
    if kind == "sigmoid":
      e = hp.get("label_smoothing", 0.0)
      out.append(-(1 - e) * ls(z) - e * ls(-z))
    elif kind == "robust":
      e = hp["label_smoothing"]
      out.append((-(1 - e) * ls(z) + e * ls(-z)) / (1 - 2 * e))
    elif kind == "hinge":
      out.append(max(0.0, 1 - z))
    elif kind == "ipo":
      out.append((rw / lw - rl / ll - 1 / (2 * BETA)) ** 2)
    elif kind == "sigmoid_norm":
      out.append(-ls(BETA * (rw / lw - rl / ll)))
    elif kind == "simpo":
      g = hp["gamma"]
      out.append(-ls(BETA * (CHOSEN[i] / lw - REJECTED[i] / ll) - g))
    elif kind == "dpop":
      lam = hp["dpop_lambda"]
      out.append(-ls(BETA * (d - lam * max(0.0, REF_CHOSEN[i] - CHOSEN[i]))))
    elif kind == "nca_pair":
      out.append(-ls(BETA * rw) - 0.5 * ls(-BETA * rw) - 0.5 * ls(-BETA * rl))
    elif kind == "sppo_hard":
      out.append((rw - 1 / (2 * BETA)) ** 2 + (rl + 1 / (2 * BETA)) ** 2)
    elif kind == "apo_zero":
      out.append(1 - sig(BETA * rw) + sig(BETA * rl))
    elif kind == "apo_down":
      out.append(sig(BETA * rw) + 1 - sig(z))
    elif kind == "exo_pair":
      e = hp["label_smoothing"]
      out.append(sig(z) * (ls(z) - math.log(1 - e)) + sig(-z) * (ls(-z) - math.log(e)))
    elif kind == "discopop":
      m = sig(z / hp["discopop_tau"])
      out.append((1 - m) * -ls(z) + m * math.exp(-z))
    else:
      raise KeyError(kind)
  return out


CASES = [
  ("sigmoid", {}),
  ("sigmoid", {"label_smoothing": 0.2}),
  ("robust", {"label_smoothing": 0.1}),
  ("hinge", {}),
  ("ipo", {}),
  ("sigmoid_norm", {}),
  ("simpo", {"gamma": 0.5}),
  ("dpop", {"dpop_lambda": 50.0}),
  ("nca_pair", {}),
  ("sppo_hard", {}),
  ("apo_zero", {}),
  ("apo_down", {}),
  ("exo_pair", {"label_smoothing": 1e-3}),
  ("discopop", {"discopop_tau": 0.05}),
]


@pytest.mark.parametrize("kind,hp", CASES, ids=[f"{k}{hp}" for k, hp in CASES])
def test_loss_matches_hand_computed(kind, hp):
  loss, _, _ = run(kind, **hp)
  np.testing.assert_allclose(np.asarray(loss), hand(kind, **hp), rtol=1e-5, atol=1e-6)


def test_dpop_penalty_only_when_chosen_falls_below_reference():
  # pair 0 and 1: chosen above the reference (no penalty, DPO); pair 2: 0.5 below it
  dpop, metrics, _ = run("dpop", dpop_lambda=50.0)
  dpo, _, _ = run("sigmoid")
  np.testing.assert_allclose(np.asarray(dpop)[:2], np.asarray(dpo)[:2], rtol=1e-6)
  assert float(dpop[2]) > float(dpo[2])
  np.testing.assert_allclose(float(metrics["dpop/penalty"]), 0.5 / 3, rtol=1e-6)


def test_simpo_ignores_the_reference():
  a, _, _ = run("simpo", gamma=0.5)
  b, _, _ = run("simpo", gamma=0.5, ref_chosen=[0.0] * 3, ref_rejected=[100.0] * 3)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- docs/reference/acpo.md#test-vectors: policy = reference (every rho = 0) ----------------------

AT_REFERENCE = [
  ("sigmoid", {}, LN2),
  ("dpo", {}, LN2),
  ("sigmoid", {"label_smoothing": 0.1}, LN2),
  ("robust", {"label_smoothing": 0.1}, LN2),
  ("dpop", {}, LN2),
  ("acpo", {}, LN2),
  ("acpo", {"alpha_mode": "batch"}, LN2),
  ("ipo", {}, (1 / (2 * BETA)) ** 2),
  ("hinge", {}, 1.0),
  ("nca_pair", {}, 2 * LN2),
  ("apo_zero", {}, 1.0),
  ("apo_down", {}, 1.0),
  ("sppo_hard", {}, 2 * (1 / (2 * BETA)) ** 2),
  ("simpo", {"gamma": 0.5}, -ls(-0.5)),
  ("bco_pair", {}, 2 * LN2),
]


@pytest.mark.parametrize(
  "kind,hp,expected", AT_REFERENCE, ids=[f"{k}{hp}" for k, hp, _ in AT_REFERENCE]
)
def test_values_at_policy_equals_reference(kind, hp, expected):
  same = [-3.0, -8.0]
  loss, metrics, _ = run(
    kind,
    chosen=same,
    rejected=same,
    ref_chosen=same,
    ref_rejected=same,
    chosen_len=[2.0, 2.0],
    rejected_len=[2.0, 2.0],
    **hp,
  )
  np.testing.assert_allclose(np.asarray(loss), [expected] * 2, rtol=1e-6)
  if kind == "acpo":  # r_l = 0: the guard gives alpha = 1, plain DPO
    assert float(metrics["acpo/alpha_mean"]) == 1.0
    assert float(metrics["acpo/guard_frac"]) == 1.0


# --- ACPO ---------------------------------------------------------------------------------------


def hand_acpo(delta, mode="per_sample", clip=(0.0, 1.0), guard=1e-6):
  """(losses, alphas, clipped flags, tau) of docs/reference/acpo.md#acpo-reconstruction."""
  n = len(CHOSEN)
  r = [(BETA * rhos(i)[0], BETA * rhos(i)[1]) for i in range(n)]
  tau = sum(delta * (CHOSEN_LEN[i] + REJECTED_LEN[i]) for i in range(n)) / n
  losses, alphas, clipped = [], [], []
  for i in range(n):
    rw, rl = r[i]
    if mode == "batch":
      num = sum(a for a, _ in r) / n - tau
      den = sum(b for _, b in r) / n
    else:
      num, den = rw - tau, rl
    if abs(den) < guard:
      a, c = 1.0, False
    else:
      a = num / den
      c = clip is not None and (a < clip[0] or a > clip[1])
      if clip is not None:
        a = min(max(a, clip[0]), clip[1])
    losses.append(-ls(rw - a * rl))
    alphas.append(a)
    clipped.append(c)
  return losses, alphas, clipped, tau


@pytest.mark.parametrize("mode", ["per_sample", "batch"])
@pytest.mark.parametrize("clip", [(0.0, 1.0), (0.0, 5.0), None])
def test_acpo_matches_hand_computed(mode, clip):
  delta = 0.02
  loss, metrics, _ = run("acpo", delta=delta, alpha_mode=mode, alpha_clip=clip)
  losses, alphas, clipped, tau = hand_acpo(delta, mode, clip)
  np.testing.assert_allclose(np.asarray(loss), losses, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["acpo/alpha_mean"]), np.mean(alphas), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["acpo/alpha_clip_frac"]), np.mean(clipped))
  np.testing.assert_allclose(float(metrics["acpo/tau"]), tau, rtol=1e-6)


def test_acpo_examples_exercise_every_branch():
  """The data above clips some alphas, leaves others inside [0, 1] (so the tests can fail)."""
  _, alphas, clipped, _ = hand_acpo(0.02)
  raw = hand_acpo(0.02, clip=None)[1]
  assert any(clipped) and not all(clipped)
  assert any(0.0 < a < 1.0 for a in alphas)
  assert any(a < 0.0 for a in raw) or any(a > 1.0 for a in raw)


def test_acpo_with_alpha_one_is_dpo_exactly():
  dpo, dpo_metrics, _ = run("sigmoid")
  acpo, acpo_metrics, _ = run("acpo", alpha_clip=(1.0, 1.0))
  np.testing.assert_array_equal(np.asarray(acpo), np.asarray(dpo))
  for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    assert float(acpo_metrics[name]) == float(dpo_metrics[name])
  assert float(acpo_metrics["acpo/alpha_mean"]) == 1.0


def test_acpo_guard_for_small_rejected_reward():
  # pair 1 has rho_l = 0 exactly (r_l below any guard); pair 0 |r_l| = 0.05
  chosen, rejected = [-10.0, -4.0], [-12.5, -5.0]
  ref_c, ref_r = [-11.0, -5.0], [-12.0, -5.0]
  kw = dict(
    chosen=chosen,
    rejected=rejected,
    ref_chosen=ref_c,
    ref_rejected=ref_r,
    chosen_len=[1.0, 1.0],
    rejected_len=[1.0, 1.0],
    delta=0.0,
  )
  loss, metrics, _ = run("acpo", guard_eps=0.1, **kw)  # both guarded: DPO
  dpo, _, _ = run("sigmoid", **{k: v for k, v in kw.items() if k != "delta"})
  np.testing.assert_allclose(np.asarray(loss), np.asarray(dpo), rtol=1e-6)
  assert float(metrics["acpo/guard_frac"]) == 1.0
  loss, metrics, _ = run("acpo", guard_eps=0.01, **kw)  # only pair 1
  assert float(metrics["acpo/guard_frac"]) == 0.5
  assert np.isfinite(np.asarray(loss)).all()


def _grads(kind, chosen, rejected, **hp):
  f = lambda c, r: run(kind, chosen=c, rejected=r, **hp)[0].sum()
  return jax.grad(f, argnums=(0, 1))(
    jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32)
  )


def test_acpo_gradient_chosen_is_dpo_rejected_scaled_by_alpha():
  """With alpha detached: dL/dlogp_w = -beta s(-z), dL/dlogp_l = alpha beta s(-z) (z the ACPO
  margin), i.e. DPO's gradients at the same margin with the rejected one times alpha."""
  delta = 0.02
  g_w, g_l = _grads("acpo", CHOSEN, REJECTED, delta=delta)
  _, alphas, _, _ = hand_acpo(delta)
  # DPO at the same margin: the rejected log-ratio replaced by alpha * rho_l
  scaled = [REF_REJECTED[i] + alphas[i] * rhos(i)[1] for i in range(3)]
  d_w, d_l = _grads("sigmoid", CHOSEN, scaled)
  np.testing.assert_allclose(np.asarray(g_w), np.asarray(d_w), rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(g_l), np.asarray(alphas) * np.asarray(d_l), rtol=1e-6, atol=1e-9
  )
  for i in range(3):  # and the closed forms
    rw, rl = BETA * rhos(i)[0], BETA * rhos(i)[1]
    s = sig(-(rw - alphas[i] * rl))
    np.testing.assert_allclose(float(g_w[i]), -BETA * s, rtol=1e-5)
    np.testing.assert_allclose(float(g_l[i]), alphas[i] * BETA * s, rtol=1e-5, atol=1e-9)
  assert any(0.0 < a < 1.0 for a in alphas)  # the check means something


def test_dpo_gradients_are_equal_and_opposite():
  g_w, g_l = _grads("sigmoid", CHOSEN, REJECTED)
  np.testing.assert_allclose(np.asarray(g_l), -np.asarray(g_w), rtol=1e-6)
  for i in range(3):
    np.testing.assert_allclose(
      float(g_w[i]), -BETA * sig(-BETA * (rhos(i)[0] - rhos(i)[1])), rtol=1e-5
    )


def test_acpo_undetached_alpha_changes_the_gradient():
  kw = dict(delta=0.02, alpha_clip=None)
  g_det = _grads("acpo", CHOSEN, REJECTED, **kw)
  g_live = _grads("acpo", CHOSEN, REJECTED, detach_alpha=False, **kw)
  assert not np.allclose(np.asarray(g_det[0]), np.asarray(g_live[0]))


# --- metrics, masks, state ----------------------------------------------------------------------


def test_metrics_follow_trl():
  _, m, _ = run("sigmoid")
  rw = [BETA * rhos(i)[0] for i in range(3)]
  rl = [BETA * rhos(i)[1] for i in range(3)]
  np.testing.assert_allclose(float(m["rewards/chosen"]), np.mean(rw), rtol=1e-5)
  np.testing.assert_allclose(float(m["rewards/rejected"]), np.mean(rl), rtol=1e-5)
  np.testing.assert_allclose(float(m["rewards/margins"]), np.mean(np.subtract(rw, rl)), rtol=1e-5)
  np.testing.assert_allclose(float(m["rewards/accuracies"]), np.mean(np.greater(rw, rl)))
  np.testing.assert_allclose(float(m["logps/chosen"]), np.mean(CHOSEN), rtol=1e-6)
  np.testing.assert_allclose(float(m["logps/rejected"]), np.mean(REJECTED), rtol=1e-6)
  # a tie is not a correct ranking (strict >)
  _, m, _ = run(
    "sigmoid",
    chosen=[-1.0],
    rejected=[-1.0],
    ref_chosen=[-1.0],
    ref_rejected=[-1.0],
    chosen_len=[1.0],
    rejected_len=[1.0],
  )
  assert float(m["rewards/accuracies"]) == 0.0


def test_simpo_metrics_follow_trl_cpo():
  """TRL's CPOTrainer with loss_type="simpo" averages each response's log-probs over its
  tokens and logs rewards = beta * those averages; accuracy compares the two rewards, so it
  follows SimPO's own (length-normalised) comparison, not the summed log-probs'."""
  chosen, rejected, chosen_len, rejected_len = [-10.0, -6.0], [-20.0, -30.0], [2, 3], [10, 10]
  _, m, _ = run(
    "simpo",
    chosen=chosen,
    rejected=rejected,
    ref_chosen=[0.0, 0.0],
    ref_rejected=[0.0, 0.0],
    chosen_len=chosen_len,
    rejected_len=rejected_len,
    gamma=0.5,
  )
  avg_w = [c / n for c, n in zip(chosen, chosen_len)]  # [-5, -2]
  avg_l = [r / n for r, n in zip(rejected, rejected_len)]  # [-2, -3]
  rw, rl = [BETA * a for a in avg_w], [BETA * a for a in avg_l]
  expected = {
    "rewards/chosen": np.mean(rw),
    "rewards/rejected": np.mean(rl),
    "rewards/margins": np.mean(np.subtract(rw, rl)),
    "rewards/accuracies": np.mean(np.greater(rw, rl)),
    "logps/chosen": np.mean(avg_w),
    "logps/rejected": np.mean(avg_l),
  }
  assert expected["rewards/accuracies"] == 0.5  # summed log-probs would rank both right
  for name, value in expected.items():
    np.testing.assert_allclose(float(m[name]), value, rtol=1e-6, atol=1e-7, err_msg=name)
  # the reference never enters SimPO's metrics
  _, m2, _ = run(
    "simpo",
    chosen=chosen,
    rejected=rejected,
    ref_chosen=[-1.0, -7.0],
    ref_rejected=[-3.0, -2.0],
    chosen_len=chosen_len,
    rejected_len=rejected_len,
    gamma=0.5,
  )
  for name in expected:
    assert float(m2[name]) == float(m[name]), name


def test_ipo_metrics_are_per_token_like_trl_dpo():
  """TRL's DPOTrainer divides IPO's log-probs (policy and reference) by the response length
  before the loss and the logged rewards / logps."""
  _, m, _ = run("ipo")
  rw = [BETA * rhos(i)[0] / CHOSEN_LEN[i] for i in range(3)]
  rl = [BETA * rhos(i)[1] / REJECTED_LEN[i] for i in range(3)]
  np.testing.assert_allclose(float(m["rewards/chosen"]), np.mean(rw), rtol=1e-5)
  np.testing.assert_allclose(float(m["rewards/rejected"]), np.mean(rl), rtol=1e-5)
  np.testing.assert_allclose(float(m["rewards/accuracies"]), np.mean(np.greater(rw, rl)))
  np.testing.assert_allclose(
    float(m["logps/chosen"]), np.mean(np.divide(CHOSEN, CHOSEN_LEN)), rtol=1e-6
  )


def test_padding_pairs_count_for_nothing():
  mask = jnp.asarray([1.0, 0.0, 1.0])
  loss, m, _ = run("acpo", delta=0.02, mask=mask)
  assert float(loss[1]) == 0.0
  keep = [0, 2]
  sub = lambda x: [x[i] for i in keep]
  loss2, m2, _ = run(
    "acpo",
    delta=0.02,
    chosen=sub(CHOSEN),
    rejected=sub(REJECTED),
    ref_chosen=sub(REF_CHOSEN),
    ref_rejected=sub(REF_REJECTED),
    chosen_len=sub(CHOSEN_LEN),
    rejected_len=sub(REJECTED_LEN),
  )
  np.testing.assert_allclose(np.asarray(loss)[keep], np.asarray(loss2), rtol=1e-6)
  for name in m2:
    np.testing.assert_allclose(float(m[name]), float(m2[name]), rtol=1e-6, err_msg=name)


def test_bco_running_mean_and_mpo_mix():
  """BCO-pair's shift is the count-weighted mean of per-step batch-mean rewards (TRL <= 0.2x),
  updated before the loss; MPO = 0.8 DPO + 0.2 BCO-pair + 1.0 token-mean SFT on the chosen."""
  state = pl.init_state("bco_pair")
  means = []
  for step in range(2):
    shift = 1.5 * step
    chosen = [c + shift for c in CHOSEN]
    loss, m, state = run("bco_pair", chosen=chosen, state=state)
    rw = [BETA * (chosen[i] - REF_CHOSEN[i]) for i in range(3)]
    rl = [BETA * rhos(i)[1] for i in range(3)]
    means.append(0.5 * (np.mean(rw) + np.mean(rl)))
    delta = float(np.mean(means))
    expected = [-ls(rw[i] - delta) - ls(-(rl[i] - delta)) for i in range(3)]
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(m["bco/delta"]), delta, rtol=1e-5)

  mpo, m, _ = run("mpo")
  bco, _, _ = run("bco_pair")
  tokens = sum(CHOSEN_LEN)
  sft = [-c * 3 / tokens for c in CHOSEN]  # per-pair share of the batch token mean
  expected = 0.8 * np.asarray(hand("sigmoid")) + 0.2 * np.asarray(bco) + np.asarray(sft)
  np.testing.assert_allclose(np.asarray(mpo), expected, rtol=1e-5)
  np.testing.assert_allclose(float(np.mean(sft)), -sum(CHOSEN) / tokens, rtol=1e-6)
  np.testing.assert_allclose(float(m["sft/nll"]), -sum(CHOSEN) / tokens, rtol=1e-5)
  seq, _, _ = run("mpo", sft_reduction="sequence")
  np.testing.assert_allclose(
    np.asarray(seq) - np.asarray(mpo),
    [-CHOSEN[i] / CHOSEN_LEN[i] - sft[i] for i in range(3)],
    rtol=1e-5,
  )


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="not one of"):
    run("nope")
  with pytest.raises(ValueError, match="unknown hyperparameters"):
    run("sigmoid", delta=0.1)
  with pytest.raises(ValueError, match="alpha_mode"):
    run("acpo", alpha_mode="row")
  with pytest.raises(ValueError, match="label_smoothing"):
    run("robust", label_smoothing=0.5)


# --- the alpha table of docs/acpo.md ------------------------------------------------------------

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "acpo.md"
BRANCH_METRIC = {
  "guard": "acpo/guard_frac",
  "low": "acpo/alpha_low_frac",
  "high": "acpo/alpha_high_frac",
  "inside": "acpo/alpha_inside_frac",
}


def docs_alpha_rows():
  """(r_w, r_l, alpha* text, alpha, branch, loss) of each row of docs/acpo.md's alpha table."""
  text = DOCS.read_text()
  table = text.split("<!-- alpha-table -->")[1].split("<!-- /alpha-table -->")[0]
  rows = []
  for line in table.strip().splitlines()[2:]:
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
    first_number = lambda c: float(re.match(r"-?[0-9.]+", c).group())
    rows.append(
      (
        float(cells[1]),
        float(cells[2]),
        cells[3],
        first_number(cells[4]),
        cells[5],
        first_number(cells[6]),
      )
    )
  return rows


def test_docs_alpha_table():
  """Every row of the table in docs/acpo.md is what the code computes: beta 0.1, delta 0.01,
  one pair of 3 + 4 answer tokens (tau = 0.07), rewards r = beta * (logp - ref_logp)."""
  rows = docs_alpha_rows()
  assert len(rows) >= 7 and {r[4] for r in rows} == set(BRANCH_METRIC)
  tau = 0.01 * (3 + 4)
  for r_w, r_l, alpha_star_text, alpha, branch, loss in rows:
    per_pair, m, _ = run(
      "acpo",
      chosen=[r_w / BETA],
      rejected=[r_l / BETA],
      ref_chosen=[0.0],
      ref_rejected=[0.0],
      chosen_len=[3.0],
      rejected_len=[4.0],
      delta=0.01,
    )
    where = f"row r_w={r_w}, r_l={r_l}"
    assert float(m["acpo/tau"]) == pytest.approx(tau), where
    assert float(m["acpo/alpha_mean"]) == pytest.approx(alpha, abs=5e-4), where
    assert float(per_pair[0]) == pytest.approx(loss, abs=5e-5), where
    assert float(m[BRANCH_METRIC[branch]]) == 1.0, where
    if branch == "guard":
      assert alpha_star_text == "undefined", where
    else:
      assert float(alpha_star_text) == pytest.approx((r_w - tau) / r_l, abs=5e-4), where
    if branch == "inside":  # the scaled margin is tau: the loss is the constant -log s(tau)
      assert float(m["acpo/scaled_margin"]) == pytest.approx(tau, abs=1e-6), where
      assert loss == pytest.approx(-ls(tau), abs=5e-5), where
