"""Preference stage: ACPO (or another loss of the DPO family) on preference pairs after SFT.

    neo-jax train --config configs/preference.py:neo_2b --config.init.path=/runs/neo_2b_sft \
        --config.data.sources='("jsonl:/data/pairs.jsonl@/data/images",)' \
        --config.workdir=/runs/neo_2b_acpo
    neo-jax train --config configs/preference.py:neo_9b,loss=mpo
    neo-jax train --config configs/preference.py:tiny
    neo-jax train --config configs/preference.py:tiny,loss=dpo
    neo-jax train --config configs/preference.py:tiny,local

`loss=KIND` picks the loss (default acpo; dpo = sigmoid, mpo, simpo, ... docs/acpo.md); the run
is named after it. Policy and frozen reference both start from the SFT run (params only; the
reference is saved to WORKDIR/reference/ once). Each packed row lays out prompt | chosen |
rejected pairs; one forward scores both answers. ACPO as reconstructed in docs/acpo.md (beta
0.1, delta 0.01, alpha per pair clipped to [0, 1] and detached).

neo_2b, neo_9b: ACPO's own recipe is unpublished, so this is InternVL MPO's
(docs/reference/acpo.md#mpo): lr 5e-6, cosine to 0, warm-up 3%, weight decay 0.05, beta 0.1,
~256 pairs per update, one epoch of ~320K pairs (the size of ACPO's data); images as in SFT.
Expect: loss ln 2 = 0.693 at step 1 (policy = reference), train/rewards/margins and
rewards/accuracies rising; watch train/rewards/chosen and logps/chosen (they should not fall
as they tend to under DPO) and acpo/alpha_mean.

tiny: the demo's stages 3 (loss=dpo) and 4 (acpo), from workdir/tiny_vqa_sft (init.format
"run") on the embedded easy-vqa preference pairs (chosen = the right answer, rejected = a
plausible wrong one): 30 updates of 32 one-pair rows at a small learning rate (2e-4), one
held-out evaluation (preference loss and easy-vqa exact match on 100 test questions) after
the last step. `neo-jax compare-preference` runs dpo and acpo from the same SFT checkpoint
and plots rewards/chosen and logps/chosen (docs/acpo.md).
Expect (measured on 2 CPU cores in the demo, 2026-11-30, after its SFT run; one run each):
0.3 min each; over the 30 steps train/logps/chosen from -0.08 to -0.51,
train/rewards/chosen from 0 to -0.029 and train/rewards/margins from 0 to 0.159; easy-vqa
exact match on 1,000 test questions 93.5% against the SFT run's 94.2% (the config's own
evaluation answers 100). With loss=dpo margins rise a little faster (to 0.182) while
logps/chosen falls to -0.97 and rewards/chosen to -0.076 (likelihood displacement), and exact
match to 89.4% (shape 81.8%, yes/no 89.3%).

local (with any model): seconds on any machine, on synthetic pairs (configs/common.py).
"""

import common
import ml_collections


def preference_options(loss: str) -> ml_collections.ConfigDict:
  """config.preference: the loss and every option of the DPO family (docs/acpo.md)."""
  p = ml_collections.ConfigDict()
  # sigmoid (= dpo) | robust | hinge | ipo | sigmoid_norm | simpo | dpop | nca_pair | sppo_hard
  # | apo_zero | apo_down | exo_pair | discopop | bco_pair | mpo | acpo
  p.loss = loss
  p.reference = "model"  # model: frozen copy of the start | batch: ref_*_logps keys | none
  p.beta = 0.1  # TRL / MPO default
  p.label_smoothing = 0.0  # cDPO / robust eps (exo_pair needs > 0, e.g. 1e-3)
  p.gamma = 0.5  # SimPO target margin (TRL's simpo_gamma)
  p.dpop_lambda = 50.0  # DPOP penalty weight
  p.discopop_tau = 0.05
  p.mpo_weights = (0.8, 0.2)  # MPO: DPO and BCO-pair weights
  p.sft_weight = -1.0  # NLL on the chosen response (RPO); < 0: the loss's default (mpo 1, else 0)
  p.sft_reduction = "token"  # token: token mean over the batch (TRL, MPO code) | sequence
  # ACPO (docs/reference/acpo.md#acpo-reconstruction): alpha = clip((r_w - tau) / r_l),
  # tau = delta * (|y_w| + |y_l|) averaged over the batch; alpha = 1 where |r_l| < guard_eps
  p.delta = 0.01  # per-token reward target (unknown in the paper; sweep 0 - 0.05)
  p.alpha_mode = "per_sample"  # | batch (one alpha from the batch means of the rewards)
  p.alpha_clip = (0.0, 1.0)  # (): no clipping
  p.detach_alpha = True
  p.guard_eps = 1e-6
  return p


def get_config(arg=None):
  a = common.parse_arg(arg, local=False, loss="acpo")
  config = common.base_config(a.model, "preference")  # every parameter trains
  config.objective = "preference"  # neo_jax/objectives/preference/
  config.data.kind = "preference"  # packed prompt | chosen | rejected rows
  config.data.sources = ()  # empty: the embedded easy-vqa pairs
  config.preference = preference_options(a.loss)
  if a.model == "tiny":
    common.tiny_cpu(config)
    config.init.path = "workdir/tiny_vqa_sft"
    config.total_steps = 30
    config.data.rows_per_shard = 32  # one pair per row
    config.optimizer.lr = 2e-4
    config.optimizer.warmup_steps = 3
    config.loss.positions_per_row = 8  # response tokens per row (~6 per pair)
    config.log.every_steps = 1
    config.checkpoint.every_steps = 30
    config.eval.every_steps = 30  # once, at the end
    config.eval.heldout_batches = 2  # preference loss on test pairs
    config.eval.vqa_examples = 100  # greedy answers to easy-vqa test questions
  else:  # InternVL MPO's recipe, on SFT's images
    config.init.format = "neo"
    # one epoch of ~320K pairs at ~256 pairs per update (MPO's global batch): 4 micro-batches
    # of 8 packed 16,384-token rows, ~8 pairs per row
    config.total_steps = 1250
    config.grad_accum_steps = 4  # one row per GPU: 32 rows per update on 8 GPUs
    config.data.seq_len = 16384
    config.data.visual_budget = config.data.seq_len // 2
    config.loss.positions_per_row = 4096  # response tokens per row (P = 2,048 pairs at most)
    config.model.min_pixels = 256**2
    config.model.max_pixels = 4096**2
    config.optimizer.lr = 5e-6
    config.optimizer.schedule = "cosine"
    config.optimizer.min_lr_ratio = 0.0
    config.optimizer.warmup_ratio = 0.03
    config.optimizer.weight_decay = 0.05
    config.checkpoint.every_steps = 250
  config.name = config.name.replace("preference", a.loss)
  config.workdir = config.workdir.replace("preference", a.loss)
  if a.local:
    common.local(
      config, batch_size=4, seq_len=96, visual_budget=24, positions_per_row=32, warmup_steps=0
    )
  return config
