"""A stateful preference loss (MPO: the BCO reward shift) resumes exactly: the shift and the
frozen reference come back from the run directory, not from the (moved-on) starting point."""

import os

import numpy as np
import pytest

from neo_jax.train.checkpoint import RunCheckpointer
from neo_jax.train.metrics import read_jsonl
from neo_jax.train.preference_data import PairIterator, PairSpec
from neo_jax.train.trainer import Trainer

from test_preference_step import _trainer_config


pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py


def _run(workdir, steps, model_config):
  cfg = _trainer_config(workdir, steps, "--config.preference.loss=mpo",
                        "--config.optimizer.lr=3e-3", "--config.checkpoint.every_steps=2",
                        "--config.checkpoint.async_save=false")
  spec = PairSpec.for_model(model_config, batch_size=4, seq_len=96, visual_tokens=24,
                            gather_size=32, pairs_per_row=3, seed=2)
  return Trainer(cfg, data_iterator=PairIterator(spec)).run()


def _train_records(workdir):
  return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r}


def test_mpo_resume_is_exact(tmp_path):
  from neo_jax.train.config_lib import model_config
  cfg = _trainer_config(tmp_path / "x", 1)
  mc = model_config(cfg)
  straight, split = tmp_path / "straight", tmp_path / "split"
  assert _run(straight, 4, mc).status == "completed"
  assert _run(split, 2, mc).step == 2
  assert _run(split, 4, mc).step == 4
  a, b = _train_records(straight), _train_records(split)
  for step in (3, 4):
    for name in ("train/loss", "train/bco/delta", "train/rewards/margins", "train/sft/nll"):
      np.testing.assert_allclose(b[step][name], a[step][name], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{name} at step {step}")
  # the shift moved off 0 (so the check means something) and is in the checkpoint
  assert abs(a[4]["train/bco/delta"]) > 1e-4
  ckpt = RunCheckpointer(str(split), read_only=True)
  assert ckpt.all_steps() == [2, 4]
