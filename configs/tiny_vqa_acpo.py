"""Tiny NEO, preference stage (ACPO): prefer right easy-vqa answers, starting from the SFT run.

    neo-jax train --config configs/tiny_vqa_pretrain.py
    neo-jax train --config configs/tiny_vqa_sft.py
    neo-jax train --config configs/tiny_vqa_acpo.py

Reads the parameters of workdir/tiny_vqa_sft's newest checkpoint (init.format "run") as both
the policy and the frozen reference, and trains every parameter on the embedded easy-vqa
preference pairs (chosen = the right answer, rejected = a plausible wrong one) with ACPO as
reconstructed in docs/acpo.md (alpha per pair, clipped to [0, 1], detached). Each row packs
prompt | chosen | rejected pairs; one forward scores both answers. `--config.preference.loss=
sigmoid` is plain DPO (configs/tiny_vqa_dpo.py).
Expect (2 shared CPU cores): ~2 s per step after compiling, ~1.5 min in all with the final
evaluation; train/rewards/margins rising from 0 and train/rewards/accuracies towards 1, and
easy-vqa exact match on 100 test questions at least the SFT run's (~70%).
"""

import common


def get_config(arg=None):
  del arg
  return common.tiny_preference_config("acpo")
