"""NEO-9B preference stage (ACPO): every parameter trains on preference pairs after SFT.

    neo-jax train --config configs/neo_9b_acpo.py \
        --config.init.path=/runs/neo_9b_sft \
        --config.data.sources='("jsonl:/data/pairs.jsonl@/data/images",)' \
        --config.workdir=/runs/neo_9b_acpo

Policy and frozen reference both start from the SFT run (params only; the reference is saved
to WORKDIR/reference/ once). ACPO as reconstructed in docs/acpo.md (beta 0.1, delta 0.01,
alpha per pair clipped to [0, 1] and detached); --config.preference.loss=sigmoid gives DPO,
=mpo InternVL's MPO. ACPO's own recipe is unpublished, so this is InternVL MPO's: lr 5e-6,
cosine to 0, warm-up 3%, weight decay 0.05, ~256 pairs per update (4 micro-batches of 8 packed
16,384-token rows), 1,250 updates (one epoch of ~320K pairs, the size of ACPO's data).
Expect: loss ln 2 = 0.693 at step 1 (policy = reference), train/rewards/margins and
rewards/accuracies rising; watch train/rewards/chosen and logps/chosen (they should not fall
as they tend to under DPO) and acpo/alpha_mean.
"""

import common


def get_config(arg=None):
  del arg
  return common.preference_stage_config("neo_9b", "acpo")
