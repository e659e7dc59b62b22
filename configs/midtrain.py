"""Stage 2, midtrain: every parameter trains on conversations and long, large images.

    neo-jax train --config configs/midtrain.py:neo_2b --config.init.path=/runs/neo_2b_pt \
        --config.data.sources='("tfds:/data/midtrain",)' --config.workdir=/runs/neo_2b_mt
    neo-jax train --config configs/midtrain.py:neo_9b --config.init.path=/runs/neo_9b_pt
    neo-jax train --config configs/midtrain.py:neo_2b,local

Starts from the parameters of the pretrain run directory (or any NEO checkpoint: an HF NEO
directory or a neo-jax params directory; init.format "neo" detects which) with a fresh
optimizer. The recipe below is NEO's scripts' (docs/reference/neo.md#scripted-hyperparameters);
the 9B script trains on shorter rows and warms up for 200 steps instead of 3%.
Expect: the loss continues from the pretrain level and falls slowly; checkpoints every 1000
updates; restarting the command resumes exactly (data position included).

There is no tiny midtrain: the demo goes from pretrain to SFT.
"""

import common


def get_config(arg=None):
  a = common.parse_arg(arg, models=("neo_2b", "neo_9b"), local=False)
  config = common.base_config(a.model, "midtrain")
  config.data.kind = "sft"  # conversations
  config.init.format = "neo"
  config.total_steps = 50_000
  config.grad_accum_steps = 2  # one packed row per GPU: 16 rows per update on 8 GPUs
  config.data.seq_len = 32768
  config.model.min_pixels = 256**2
  config.model.max_pixels = 4096**2
  config.optimizer.lr = 5e-5
  config.optimizer.schedule = "cosine_with_min_lr"
  config.optimizer.min_lr_ratio = 0.2
  config.optimizer.warmup_ratio = 0.03
  if a.model == "neo_9b":
    config.data.seq_len = 18432
    config.optimizer.warmup_ratio = 0.0
    config.optimizer.warmup_steps = 200
  config.data.visual_budget = config.data.seq_len // 2
  if a.local:
    common.local(
      config, batch_size=8, seq_len=64, visual_budget=24, positions_per_row=16, warmup_steps=2
    )
  return config
