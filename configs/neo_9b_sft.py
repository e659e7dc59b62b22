"""NEO-9B stage 3 (SFT): every parameter trains on instruction conversations.

    neo-jax train --config configs/neo_9b_sft.py \
        --config.init.path=/runs/neo_9b_mt \
        --config.data.sources='("jsonl:/data/sft.jsonl@/data/images",)' \
        --config.workdir=/runs/neo_9b_sft

Starts from the midtrain run (params only). Recipe (spec 5.1): lr 6e-5, plain cosine to 0 (the
8B script ignores min_lr_ratio), 200 warm-up steps of 4,500 updates, one micro-batch of 8
packed 18,432-token rows; only answer tokens are supervised, with NEO's square weights.
Expect: the answer loss falls within the first few hundred updates; the final checkpoint in
the run directory is what `neo-jax generate --checkpoint` and `neo-jax convert` read.
"""

import common


def get_config(arg=None):
  del arg
  return common.stage_config("neo_9b", "sft")
