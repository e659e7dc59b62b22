"""Tiny NEO, stage 3 (SFT): answer easy-vqa questions, starting from the tiny pretrain run.

    neo-jax train --config configs/tiny_vqa_pretrain.py
    neo-jax train --config configs/tiny_vqa_sft.py

Reads the parameters of workdir/tiny_vqa_pretrain's newest checkpoint (init.format "run"; set
--config.init.path='' to start from random weights) and trains every parameter on the
embedded easy-vqa conversations (chat template neo1_0, answer tokens supervised, NEO's square
loss weights). Rows of 256 tokens hold about 10 questions; the loss reads at most 48
supervised positions per row.
Expect: answer loss well below 1 within a few hundred steps; about 0.7 s per step on 2 CPU
cores (every parameter, the 19M-entry embedding included, is trained).
"""

import common


def get_config(arg=None):
  del arg
  config = common.tiny_config("sft")
  config.total_steps = 400
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_ratio = 0.03
  config.init.path = "workdir/tiny_vqa_pretrain"
  config.init.format = "run"
  config.data.visual_budget = 64
  config.loss.positions_per_row = 48
  config.eval.every_steps = 100
  config.eval.heldout_batches = 4
  return config
