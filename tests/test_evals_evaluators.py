"""The evaluators of a training run on their own: held-out loss, VQA exact match, and which of
them a config's eval group builds."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from neo_jax.config import tiny
from neo_jax.data.synthetic import compact_vocab
from neo_jax.evals.evaluators import HeldOutLoss, VqaExactMatch, from_config, heldout_batches
from neo_jax.parallel import make_mesh, replicated
from neo_jax.trainer.objective import LossOutput, eval_loss
from neo_jax.trainer.state import TrainState


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def state_with(params):
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=None, rng=jnp.zeros((2,), jnp.uint32)
  )


def weighted_loss(params, batch, objective_state=None):
  """sum(w * x) over rows, weight sum(w); x > 0 counts as a correct token."""
  x, w = batch["x"] * params["scale"], batch["w"]
  return LossOutput(
    (w * x).sum(), w.sum(), {"correct_tokens": ((x > 0) * w).sum(), "supervised_tokens": w.sum()}
  )


def test_heldout_loss_divides_sums_over_all_batches(mesh):
  batches = [
    {"x": np.array([1.0, -2.0]), "w": np.array([1.0, 1.0])},
    {"x": np.array([4.0, 3.0]), "w": np.array([0.0, 2.0])},
  ]
  evaluate = HeldOutLoss(batches, weighted_loss, mesh, {"scale": replicated(mesh)})
  out = evaluate(state_with({"scale": jnp.float32(2.0)}), step=10)
  assert out["eval/loss"] == pytest.approx(2.0 * (1 - 2 + 2 * 3) / 4)
  assert out["eval/token_accuracy"] == pytest.approx(3 / 4)
  with pytest.raises(ValueError, match="at least one batch"):
    HeldOutLoss([], weighted_loss, mesh, {"scale": replicated(mesh)})


def test_heldout_loss_of_a_stateful_objective_reads_the_training_state(mesh):
  """A stateful loss (e.g. BCO's running reward mean) is evaluated with the objective state
  training has reached, and evaluating leaves that state where it was."""

  def stateful_loss(params, batch, state):
    shifted = batch["x"] * params["scale"] - state["mean"]
    new_state = {"mean": state["mean"] + 1.0}  # what a step would do; evaluation drops it
    return LossOutput(shifted.sum(), jnp.float32(shifted.size), {}), new_state

  batches = [{"x": np.array([1.0, 3.0])}]
  evaluate = HeldOutLoss(
    batches, eval_loss(stateful_loss, stateful=True), mesh, {"scale": replicated(mesh)}
  )
  trained = state_with({"scale": jnp.float32(1.0)}).replace(
    objective_state={"mean": jnp.float32(5.0)}
  )
  assert evaluate(trained, step=4)["eval/loss"] == pytest.approx(2.0 - 5.0)
  assert evaluate(trained, step=5)["eval/loss"] == pytest.approx(2.0 - 5.0)
  initial = trained.replace(objective_state={"mean": jnp.float32(0.0)})
  assert evaluate(initial, step=0)["eval/loss"] == pytest.approx(2.0)


def test_vqa_exact_match_scores_normalised_answers():
  examples = [types.SimpleNamespace(answer=a) for a in ("red", "2", "yes")]
  calls = []

  def generate_fn(params, batch):
    calls.append(params)
    return ["Red.", "two", "no"]

  out = VqaExactMatch(examples, generate_fn)(state_with("P"), step=3)
  assert calls == ["P"]
  assert out == {"vqa/accuracy": pytest.approx(2 / 3), "vqa/examples": 3.0}
  wrong_count = VqaExactMatch(examples, lambda params, batch: ["red"])
  with pytest.raises(ValueError, match="1 answers for 3 questions"):
    wrong_count(state_with("P"), step=3)


def _eval_config(**fields):
  config = ml_collections.ConfigDict(
    {
      "eval": dict(
        every_steps=5, heldout_batches=2, split="test", sources=(), vqa_examples=0, max_new_tokens=4
      ),
      "data": dict(
        pipeline="synthetic", kind="sft", batch_size=2, seq_len=32, visual_budget=8, seed=0
      ),
      "loss": dict(positions_per_row=0),
    }
  )
  config.eval.update(fields)
  return config


def _trainer(mesh, batch_fn=None):
  return types.SimpleNamespace(
    model_config=compact_vocab(tiny(), 256),
    mesh=mesh,
    param_shardings={"scale": replicated(mesh)},
    eval_loss_fn=weighted_loss,
    batch_fn=batch_fn,
    rules=(),
  )


def test_from_config_builds_what_the_eval_group_asks_for(mesh):
  assert from_config(_eval_config(every_steps=0), _trainer(mesh)) == []
  assert from_config(_eval_config(heldout_batches=0), _trainer(mesh)) == []
  (held,) = from_config(_eval_config(), _trainer(mesh))
  assert isinstance(held, HeldOutLoss) and len(held.batches) == 2
  assert held.batches[0]["input_ids"].shape == (2, 32)


def test_heldout_batches_carry_the_objectives_arrays_once(mesh):
  calls = []

  def batch_fn(batch):
    calls.append(1)
    return {"ref": batch["segment_ids"] * 2}

  batches = heldout_batches(_eval_config(), _trainer(mesh, batch_fn))
  assert len(calls) == 2
  for b in batches:
    np.testing.assert_array_equal(b["ref"], b["segment_ids"] * 2)
