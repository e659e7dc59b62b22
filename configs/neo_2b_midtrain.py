"""NEO-2B stage 2 (midtrain): every parameter trains on conversations and long images.

    neo-jax train --config configs/neo_2b_midtrain.py \
        --config.init.path=/runs/neo_2b_pt \
        --config.data.sources='("tfds:/data/midtrain",)' --config.workdir=/runs/neo_2b_mt

Starts from the parameters of the pretrain run directory (or any NEO checkpoint: an HF NEO
directory or a neo-jax params directory; init.format "neo" detects which) with a fresh
optimizer. Recipe (spec 5.1): lr 5e-5, cosine to 0.2x, warm-up 3% of 50k updates, 2
micro-batches of 8 packed 32k-token rows per update, images up to 4096^2 pixels.
Expect: the loss continues from the pretrain level and falls slowly; checkpoints every 1000
updates; restarting the command resumes exactly (data position included).
"""

import common


def get_config(arg=None):
  del arg
  return common.stage_config("neo_2b", "midtrain")
