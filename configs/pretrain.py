"""Stage 1, pretrain: vision and the pre-Buffer learn from captions; the LLM stays frozen.

    neo-jax train --config configs/pretrain.py:neo_2b \
        --config.init.path=/ckpt/Qwen3-1.7B-Base \
        --config.data.sources='("tfds:/data/captions",)' --config.workdir=/runs/neo_2b_pt
    neo-jax train --config configs/pretrain.py:neo_9b --config.init.path=/ckpt/Qwen3-8B-Base
    neo-jax train --config configs/pretrain.py:tiny
    neo-jax train --config configs/pretrain.py:tiny,local

neo_2b, neo_9b: NEO is initialised from the HF Qwen3 Base directory (layers shifted by the
pre-Buffer depth, 12 for 2B and 6 for 9B; q_proj_hw from q_proj, k_proj_hw = 0, a random
pre-Buffer: docs/reference/neo.md#initialisation-from-qwen3) and only vision/*, pre_buffer/*
and the LLM's new H/W query/key projections and norms train; the Qwen3 layers, embeddings and
head stay frozen and hold no optimizer state (docs/reference/neo.md#what-trains-in-each-stage).
The recipe below is NEO's scripts' (docs/reference/neo.md#scripted-hyperparameters); bf16
compute with fp32 master weights and full remat.
Expect: the caption loss starts near the LLM's own text loss on the captions plus what the
untrained pre-Buffer costs and falls over the first thousands of updates; a checkpoint every
1000 updates. Set mesh.* for your slice (default: fsdp over every device).

tiny: the demo's stage 1. The random-initialised `tiny` NEO (4 layers of width 128, 2 of them
pre-Buffer, 8 query heads; the 427-token easy-vqa tokenizer, 1.4M parameters) on the embedded
easy-vqa captions. NEO's pretrain freezes a *pretrained* Qwen3; the tiny LLM starts random,
so here every parameter trains (`trainable`; drop the override to get the stage's own mask).
Images are upscaled to 128x128 (16 visual tokens each), flipped and shifted at random; rows
of 48 tokens hold two captions.
Expect (measured on 2 CPU cores in the demo, 2026-11-30): caption loss 0.18 after 800
updates of 32 rows, ~0.29 s per update (4.0 min); a loss that stays near the ~0.6 plateau it
crosses around update 100 would mean the image is not used (docs/training.md, "The main job");
checkpoints in workdir/tiny_vqa_pretrain.

local (with any model): seconds on any machine (configs/common.py).
"""

import common


def get_config(arg=None):
  a = common.parse_arg(arg, local=False)
  config = common.base_config(a.model, "pretrain")
  config.data.kind = "pretrain"  # captions
  if a.model == "tiny":
    common.tiny_cpu(config)
    config.trainable = (".*",)  # a random LLM has nothing to preserve
    # two captions per row (configs/common.py: rows of 48 tokens), 64 captions per update
    config.data.rows_per_shard = 32
    config.data.visual_budget = 2 * common.TINY_IMAGE_TOKENS
    # random flips and 4-pixel shifts of the 64x64 images: the model names the shape of test
    # images as well as of training ones, and more updates then help (docs/training.md,
    # "Augmentation and a longer pretraining")
    config.data.augment = ("flip", "shift:0.0625")
    config.total_steps = 800
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 20
    config.loss.positions_per_row = 16
  else:  # NEO's scripts: one packed row per GPU, 8 GPUs, seed 42
    config.init.format = "qwen3"
    config.total_steps = 200_000
    config.grad_accum_steps = 5  # 8 GPUs: 40 rows per update
    config.data.seq_len = 16384
    config.data.visual_budget = config.data.seq_len // 2
    config.model.min_pixels = 256**2
    config.model.max_pixels = 2048**2
    config.optimizer.lr = 8e-4
    config.optimizer.schedule = "cosine_with_min_lr"
    config.optimizer.min_lr_ratio = 0.1
    config.optimizer.warmup_steps = 1000
  if a.local:
    common.local(
      config, batch_size=8, seq_len=64, visual_budget=24, positions_per_row=16, warmup_steps=2
    )
  return config
