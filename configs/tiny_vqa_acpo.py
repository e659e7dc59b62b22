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
Expect (measured on 2 CPU cores, 2026-11-28, after the tiny SFT run): ~1.7 s per step after
compiling, 1.3 min in all; train/rewards/margins from 0 to ~0.09 and train/rewards/accuracies
from ~0.35 to ~0.76 over the 30 steps; easy-vqa exact match on 1,000 test questions 78.6%
against the SFT run's 76.8% (the config's own evaluation answers 100).
"""

import common


def get_config(arg=None):
  del arg
  return common.tiny_preference_config("acpo")
