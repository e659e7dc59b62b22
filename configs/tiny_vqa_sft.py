"""Tiny NEO, stage 3 (SFT): answer easy-vqa questions, starting from the tiny pretrain run.

    neo-jax train --config configs/tiny_vqa_pretrain.py
    neo-jax train --config configs/tiny_vqa_sft.py

Reads the parameters of workdir/tiny_vqa_pretrain's newest checkpoint (init.format "run"; set
--config.init.path='' to start from random weights) and trains every parameter on the
embedded easy-vqa conversations (chat template neo1_0, answer tokens supervised, NEO's square
loss weights). Rows of 256 tokens hold about 10 questions; the loss reads at most 48
supervised positions per row.
Expect (measured on 2 shared CPU cores, after the 150 pretrain steps): ~1.2 s per step
(every parameter, the 19.4M-entry embedding included, trains); held-out loss 0.30 and
easy-vqa exact match 69% on 100 test questions after 125 steps, 0.26 and 70% after 250
(~5.5 min with the evaluations; lr 1e-3 gave 41% and 68%).
"""

import common


def get_config(arg=None):
  del arg
  config = common.tiny_config("sft")
  config.total_steps = 250
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_ratio = 0.03
  config.init.path = "workdir/tiny_vqa_pretrain"
  config.init.format = "run"
  config.data.visual_budget = 64
  config.loss.positions_per_row = 48
  config.eval.every_steps = 125
  config.eval.heldout_batches = 4
  config.eval.vqa_examples = 100  # greedy answers to easy-vqa test questions
  return config
