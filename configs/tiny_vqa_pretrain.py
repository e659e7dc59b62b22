"""Tiny NEO, stage 1 (pretrain): learn vision from the embedded easy-vqa captions, on CPU.

    neo-jax train --config configs/tiny_vqa_pretrain.py

Random-initialised `tiny` NEO (4 layers of width 128, 2 of them pre-Buffer; Qwen3's 151,936-
token vocabulary). NEO's pretrain freezes a *pretrained* Qwen3 and trains only vision, the
pre-Buffer and the new H/W projections; the tiny LLM starts random, so here every parameter
trains (`trainable`; drop the override to get the stage's own mask). Rows of 256 tokens carry
up to 64 visual tokens (64x64 images, 2x2 tokens each); the loss reads at most 96 supervised
positions per row.
Expect (measured on 2 CPU cores, 2026-11-28): caption loss from 11.9 (ln 151936) to ~0.34
after 200 updates of 4 rows, ~1.1 s per update (~4 min); ~0.6 would mean the image is not
used (docs/training.md, "The main job"); checkpoints in workdir/tiny_vqa_pretrain.
"""

import common


def get_config(arg=None):
  del arg
  config = common.tiny_config("pretrain")
  config.trainable = (".*",)  # a random LLM has nothing to preserve
  config.data.batch_size = 4  # more, smaller updates learn vision sooner (measured below)
  config.total_steps = 200
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 20
  config.data.visual_budget = 64
  config.loss.positions_per_row = 96
  return config
