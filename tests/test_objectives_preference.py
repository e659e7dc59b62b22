"""The preference step on a small NEO: one shared-prefix forward scores chosen and rejected
exactly like two separate forwards (images included), the reference policy (frozen copy or
precomputed log-probs), and a few tiny ACPO steps through the trainer raising the margins."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax import run_dir, stage
from neo_jax.data.packing import PackingConfig, assemble_batch, make_piece
from neo_jax.data.synthetic_pairs import PairIterator, PairSpec, pack_pairs, random_rows
from neo_jax.model import NeoModel, head_weight, init_params
from neo_jax.objectives.preference import objective as pref
from neo_jax.run_dir import load_run_params
from neo_jax.trainer import config as config_lib
from neo_jax.trainer.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny NEO's preference stage shrunk (1 + 1 layers, a 512-token vocabulary, 4 rows of 96
# tokens, K = 32, random start, no evaluation)
LOCAL = os.path.join(REPO, "configs", "preference.py") + ":tiny,local"


@pytest.fixture(scope="module")
def model_config():
  return config_lib.model_config(config_lib.load_config(LOCAL))


@pytest.fixture(scope="module")
def params(model_config):
  return init_params(model_config, jax.random.key(3))


def spec_for(model_config, **fields):
  base = dict(batch_size=2, seq_len=96, visual_tokens=24, gather_size=32, pairs_per_row=3, seed=5)
  return PairSpec.for_model(model_config, **{**base, **fields})


def separate_logps(model_config, params, rows, spec, branch):
  """Summed log-probs of prompt + one response per pair, each its own ordinary segment."""
  cfg = PackingConfig(
    batch_size=spec.batch_size,
    seq_len=spec.seq_len,
    visual_budget=spec.visual_tokens,
    img_context_id=spec.img_context_id,
    img_start_id=spec.img_start_id,
    pad_id=spec.pad_id,
    loss_reduction="token",
  )
  pieces = []
  for row in rows:
    pieces.append([])
    for p in row:
      keep = p["branch_ids"] != (3 - branch)  # the prompt and this branch's response
      ids, resp = p["input_ids"][keep], p["branch_ids"][keep] == branch
      pieces[-1].append(make_piece(ids, resp, p["pixels"], p["pixel_rc"], None, cfg))
  batch = assemble_batch(pieces, cfg)
  hidden = NeoModel(model_config).apply(
    {"params": params},
    batch["input_ids"],
    batch["positions"],
    batch["segment_ids"],
    batch["pixels"],
    batch["pixel_rc"],
    None,
    return_hidden=True,
  )
  logits = jnp.einsum("bld,dv->blv", hidden, head_weight(params, model_config))
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["targets"][..., None], -1)[
    ..., 0
  ]
  logp = np.asarray(jnp.where(batch["loss_weights"] != 0, logp, 0.0), np.float64)
  out = np.zeros((spec.batch_size, pref.num_pairs(spec.gather_size)))
  lengths = np.zeros_like(out)
  for r in range(spec.batch_size):
    for s in range(1, len(rows[r]) + 1):
      on = batch["segment_ids"][r] == s
      out[r, s - 1] = logp[r][on].sum()
      lengths[r, s - 1] = (batch["loss_weights"][r][on] != 0).sum()
  return out, lengths


def test_shared_prefix_forward_equals_two_separate_forwards(model_config, params):
  spec = spec_for(model_config)
  rows = random_rows(np.random.default_rng(11), spec)
  assert all(len(row) >= 2 for row in rows)  # several pairs per row, each with an image
  batch = pack_pairs(rows, spec)
  assert batch["pixels"].any() and (batch["branch_ids"] == 2).any()
  pairs, counts = jax.jit(
    lambda p, b: pref.sequence_logps(NeoModel(model_config), p, model_config, b, chunk=16)
  )(params, batch)
  chosen, chosen_len = separate_logps(model_config, params, rows, spec, 1)
  rejected, rejected_len = separate_logps(model_config, params, rows, spec, 2)
  np.testing.assert_allclose(np.asarray(pairs.chosen), chosen, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(pairs.rejected), rejected, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(pairs.chosen_len), chosen_len)
  np.testing.assert_array_equal(np.asarray(pairs.rejected_len), rejected_len)
  n_pairs = sum(len(row) for row in rows)
  assert int(np.asarray(pairs.valid).sum()) == n_pairs
  assert float(counts["overflow_pairs"]) == 0.0
  real = np.asarray(pairs.valid)
  assert np.abs(chosen[real]).min() > 0.1 and np.abs(rejected[real]).min() > 0.1


def test_the_rejected_branch_does_not_see_the_chosen_one(model_config, params):
  """Changing a chosen token leaves every rejected log-prob as it was (and moves a chosen one)."""
  spec = spec_for(model_config)
  batch = pack_pairs(random_rows(np.random.default_rng(12), spec), spec)
  fn = jax.jit(
    lambda b: pref.sequence_logps(NeoModel(model_config), params, model_config, b, chunk=32)[0]
  )
  before = fn(batch)
  changed = dict(batch)
  ids = batch["input_ids"].copy()
  chosen_pos = np.argwhere(batch["branch_ids"] == 1)
  r, c = chosen_pos[1]  # a chosen token that is not the first one
  ids[r, c] = (ids[r, c] + 7) % 200 + 20
  changed["input_ids"] = ids
  after = fn(changed)
  np.testing.assert_array_equal(np.asarray(after.rejected), np.asarray(before.rejected))
  assert not np.allclose(np.asarray(after.chosen), np.asarray(before.chosen))


@pytest.mark.parametrize("kind", ["sigmoid", "acpo"])
def test_loss_is_ln2_at_the_reference_and_precomputed_reference_agrees(model_config, params, kind):
  spec = spec_for(model_config)
  batch = next(PairIterator(spec))
  ref = jax.jit(pref.make_reference_fn(model_config, chunk=32))(params, batch)
  with_ref = {**batch, **ref}
  hp = {"beta": 0.1} if kind == "sigmoid" else {"beta": 0.1, "delta": 0.01}
  loss_fn = pref.make_preference_loss(
    model_config, kind=kind, hparams=hp, reference="batch", chunk=32
  )
  out, _ = jax.jit(loss_fn)(params, with_ref, pref.pl.init_state(kind))
  n = float(out.weight_sum)
  assert n == sum(1 for row in random_rows(np.random.default_rng([5, 0]), spec) for _ in row)
  np.testing.assert_allclose(float(out.loss_sum) / n, math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(float(out.metrics["rewards/margins"]), 0.0, atol=1e-6)
  # another policy against the same precomputed reference: the loss moves off ln 2
  other = init_params(model_config, jax.random.key(4))
  out2, _ = jax.jit(loss_fn)(other, with_ref, pref.pl.init_state(kind))
  assert abs(float(out2.loss_sum) / n - math.log(2.0)) > 1e-3
  with pytest.raises(ValueError, match="ref_chosen_logps"):
    loss_fn(params, batch, None)


def _trainer_config(workdir, steps, *extra):
  return config_lib.load_config(
    LOCAL,
    [
      f"--config.workdir={workdir}",
      f"--config.total_steps={steps}",
      f"--config.checkpoint.every_steps={steps}",
      *extra,
    ],
  )


class TwoBatches:
  """The first two batches of a PairIterator, in turn: a few steps fit them visibly."""

  def __init__(self, spec):
    it = PairIterator(spec)
    self.batches, self.step = [next(it), next(it)], 0

  def __iter__(self):
    return self

  def __next__(self):
    self.step += 1
    return self.batches[(self.step - 1) % 2]


def test_tiny_acpo_steps_raise_the_margins(tmp_path, model_config):
  steps = 8
  cfg = _trainer_config(
    tmp_path, steps, "--config.optimizer.lr=3e-3", "--config.optimizer.schedule=constant"
  )
  spec = PairSpec.for_model(
    model_config,
    batch_size=4,
    seq_len=96,
    visual_tokens=24,
    gather_size=32,
    pairs_per_row=3,
    seed=1,
  )
  result = stage.train(cfg, data_iterator=TwoBatches(spec))
  assert result.status == "completed" and result.step == steps
  records = [r for r in read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "train/loss" in r]
  margins = [r["train/rewards/margins"] for r in records]
  # step 1 runs at policy = reference: ln 2 and zero rewards
  np.testing.assert_allclose(records[0]["train/loss"], math.log(2.0), rtol=1e-5)
  assert abs(margins[0]) < 1e-6
  assert min(margins[-2:]) > max(0.05, max(margins[:4])), margins
  assert records[-1]["train/rewards/accuracies"] > 0.6
  assert records[-1]["train/loss"] < records[1]["train/loss"] < math.log(2.0) + 1e-3
  for name in (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "acpo/alpha_mean",
    "acpo/alpha_clip_frac",
    "acpo/tau",
  ):
    assert f"train/{name}" in records[-1], name
  assert 0.0 <= records[-1]["train/acpo/alpha_mean"] <= 1.0
  # the frozen reference: saved once at the start, not moved by the steps
  import orbax.checkpoint as ocp

  reference = ocp.StandardCheckpointer().restore(os.path.join(tmp_path, run_dir.REFERENCE_DIR))
  final, _ = load_run_params(str(tmp_path))
  ref_leaf = np.asarray(reference["embed_tokens"]["embedding"])
  fin_leaf = np.asarray(final["embed_tokens"]["embedding"])
  assert ref_leaf.shape == fin_leaf.shape and not np.allclose(ref_leaf, fin_leaf)
