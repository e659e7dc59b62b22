"""Tiny NEO, preference stage with plain DPO: the baseline for configs/tiny_vqa_acpo.py.

    neo-jax train --config configs/tiny_vqa_dpo.py

Everything as tiny_vqa_acpo (start from workdir/tiny_vqa_sft, embedded easy-vqa preference
pairs, 30 steps, held-out preference loss and easy-vqa exact match at the end) except the loss:
TRL's `sigmoid`, -log s(beta (rho_w - rho_l)). `neo-jax compare-preference` runs both from the
same SFT checkpoint and plots rewards/chosen and logps/chosen (docs/acpo.md).
Expect (2 shared CPU cores): like tiny_vqa_acpo, ~1.5 min; margins rise faster than ACPO's
while rewards/chosen and logps/chosen tend to fall (likelihood displacement).
"""

import common


def get_config(arg=None):
  del arg
  config = common.tiny_preference_config("sigmoid")
  config.name = "tiny_vqa_dpo"
  config.workdir = "workdir/tiny_vqa_dpo"
  return config
