"""A stateful preference loss (MPO: the BCO reward shift) resumes exactly: the shift and the
frozen reference come back from the run directory, not from the (moved-on) starting point."""

import os
import signal

import numpy as np
import pytest

from neo_jax import stage
from neo_jax.data.synthetic_pairs import PairIterator, PairSpec
from neo_jax.trainer import config as config_lib
from neo_jax.trainer.checkpoint import RunCheckpointer
from neo_jax.trainer.metrics import read_jsonl

from test_objectives_preference import _trainer_config


pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py


def _run(workdir, model_config, hook=None):
  """4 steps (the schedule's length) of MPO; `hook` (every step) may interrupt them."""
  cfg = _trainer_config(workdir, 4, "--config.preference.loss=mpo",
                        "--config.optimizer.lr=3e-3", "--config.checkpoint.every_steps=1000",
                        "--config.checkpoint.async_save=false")
  spec = PairSpec.for_model(model_config, batch_size=4, seq_len=96, visual_tokens=24,
                            gather_size=32, pairs_per_row=3, seed=2)
  trainer = stage.build_trainer(cfg, data_iterator=PairIterator(spec))
  if hook is not None:
    trainer.add_hook(hook)
  return trainer.run()


def _train_records(workdir):
  return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r}


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
      np.testing.assert_allclose(b[step][name], a[step][name], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{name} at step {step}")
  # the shift moved off 0 (so the check means something) and is in the checkpoint
  assert abs(a[4]["train/bco/delta"]) > 1e-4
  ckpt = RunCheckpointer(str(split), read_only=True)
  assert ckpt.all_steps() == [2, 4]
