"""A stateful preference loss (MPO: the BCO reward shift) resumes exactly: the shift and the
frozen reference come back from the run directory, not from the (moved-on) starting point."""

import os
import signal

import numpy as np
import pytest
from test_objectives_preference import _trainer_config

from neo_jax import stage
from neo_jax.data.synthetic_pairs import PairIterator, PairSpec
from neo_jax.trainer import config as config_lib
from neo_jax.trainer.checkpoint import RunCheckpointer
from neo_jax.trainer.metrics import read_jsonl

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py


def _run(workdir, model_config, hook=None):
  """4 steps (the schedule's length) of MPO; `hook` (every step) may interrupt them."""
  cfg = _trainer_config(
    workdir,
    4,
    "--config.preference.loss=mpo",
    "--config.optimizer.lr=3e-3",
    "--config.checkpoint.every_steps=1000",
    "--config.checkpoint.async_save=false",
  )
  spec = PairSpec.for_model(
    model_config,
    batch_size=4,
    seq_len=96,
    visual_tokens=24,
    gather_size=32,
    pairs_per_row=3,
    seed=2,
  )
  trainer = stage.build_trainer(cfg, data_iterator=PairIterator(spec))
  if hook is not None:
    trainer.add_hook(hook)
  return trainer.run()


def _train_records(workdir):
  return {
    r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r
  }


def test_mpo_resume_is_exact(tmp_path):
  cfg = _trainer_config(tmp_path / "x", 1)
  mc = config_lib.model_config(cfg)
  straight, split = tmp_path / "straight", tmp_path / "split"

  def interrupt(info):
    if info.step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  assert _run(straight, mc).status == "completed"
  first = _run(split, mc, hook=interrupt)  # SIGTERM saves step 2; the run stops there
  assert (first.status, first.step) == ("interrupted", 2)
  assert _run(split, mc).step == 4
  a, b = _train_records(straight), _train_records(split)
  for step in (3, 4):
    for name in ("train/loss", "train/bco/delta", "train/rewards/margins", "train/sft/nll"):
      np.testing.assert_allclose(
        b[step][name], a[step][name], rtol=1e-5, atol=1e-7, err_msg=f"{name} at step {step}"
      )
  # the shift moved off 0 (so the check means something) and is in the checkpoint
  assert abs(a[4]["train/bco/delta"]) > 1e-4
  ckpt = RunCheckpointer(str(split), read_only=True)
  assert ckpt.all_steps() == [2, 4]


def test_stateful_loss_is_evaluated_with_the_training_state(tmp_path):
  """The held-out loss of BCO-pair after 4 steps uses the reward shift those steps reached,
  not the initial one, and evaluating does not move the shift training carries on with."""
  from neo_jax.evals.evaluators import HeldOutLoss, heldout_batches
  from neo_jax.objectives.preference import losses as pl

  cfg = _trainer_config(
    tmp_path,
    4,
    "--config.preference.loss=bco_pair",
    "--config.optimizer.lr=3e-3",
    "--config.eval.every_steps=4",
    "--config.eval.heldout_batches=1",
    "--config.checkpoint.async_save=false",
  )
  mc = config_lib.model_config(cfg)
  spec = PairSpec.for_model(
    mc, batch_size=4, seq_len=96, visual_tokens=24, gather_size=32, pairs_per_row=3, seed=2
  )
  trainer = stage.build_trainer(cfg, data_iterator=PairIterator(spec))
  result = trainer.run()
  logged = [r["eval/loss"] for r in result.history if "eval/loss" in r]
  shift = trainer.state.objective_state
  assert len(logged) == 1 and abs(float(shift["mean"])) > 1e-4  # the shift moved
  # the same evaluation as the hook's (same batches, same loss), at either objective state
  evaluate = HeldOutLoss(
    heldout_batches(cfg, trainer),
    trainer.eval_loss_fn,
    trainer.mesh,
    trainer.param_shardings,
    rules=trainer.rules,
  )
  at = lambda objective_state: evaluate(trainer.state.replace(objective_state=objective_state), 4)[
    "eval/loss"
  ]
  trained, initial = at(shift), at(pl.init_state("bco_pair"))
  assert logged[0] == pytest.approx(trained, rel=1e-7, abs=0.0)
  assert abs(trained - initial) > 1e-6 * abs(trained)  # ~30 float32 roundings apart
  assert float(trainer.state.objective_state["mean"]) == float(shift["mean"])
