"""NEO-2B stage 1 (pretrain): a 12-layer pre-Buffer on Qwen3-1.7B-Base learns vision from captions.

    neo-jax train --config configs/neo_2b_pretrain.py \
        --config.init.path=/ckpt/Qwen3-1.7B-Base \
        --config.data.sources='("tfds:/data/captions",)' --config.workdir=/runs/neo_2b_pt

Initialises NEO from the HF Qwen3-1.7B-Base directory (spec 5.4: layers shifted by 12, q_proj_hw
from q_proj, k_proj_hw = 0, random pre-Buffer) and trains only vision/*, pre_buffer/* and the
LLM's new H/W query/key projections and norms; the Qwen3-1.7B-Base layers, embeddings and head stay
frozen and hold no optimizer state. Recipe (spec 5.1): AdamW (0.9, 0.95, eps 1e-8, wd 0.01),
clip 1.0, lr 8e-4, 1000 warm-up steps, cosine to 0.1x over 200k updates, 5 micro-batches of
8 packed 16k-token rows per update, images of 64^2 to 2048^2 pixels; bf16 compute with fp32
master weights and full remat.
Expect: the caption loss starts near the LLM's own text loss on the captions plus what the
untrained pre-Buffer costs and falls over the first thousands of updates; a checkpoint every
1000 updates. Set mesh.* for your slice (default: fsdp over every device).
"""

import common


def get_config(arg=None):
  del arg
  return common.stage_config("neo_2b", "pretrain")
