"""AdamW with NEO's schedules, and which parameters each stage trains.

A stage names its trainable parameters by regular expressions over parameter paths
(`pre_buffer/mlp/up_proj/kernel`). The parameter tree is split into a trainable and a frozen
part; gradients and optimizer state exist only for the trainable part, so a frozen parameter
costs neither weight-gradient FLOPs nor optimizer memory, and comes out of a step bit-identical.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax
from flax import traverse_util

# Pretrain (the paper's recipe): the LLM stays frozen except the new H/W query/key projections
# and their norms; vision and the pre-Buffer learn. Later stages train everything.
HW_PARAMS = ("q_proj_hw", "k_proj_hw", "q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w")
STAGE_TRAINABLE: dict[str, tuple[str, ...]] = {
  "pretrain": ("vision/.*", "pre_buffer/.*", f"llm/self_attn/({'|'.join(HW_PARAMS)})/.*"),
  "midtrain": (".*",),
  "sft": (".*",),
  "preference": (".*",),  # ACPO / DPO family (MPO trains the LLM, MLP and ViT alike)
}

# Weight decay applies to matrices only (kernels, embeddings), not to norm scales or biases.
DECAY_LEAVES = ("kernel", "embedding")

SCHEDULES = ("cosine_with_min_lr", "cosine", "constant")


def _path(key: tuple) -> str:
  return "/".join(str(k) for k in key)


def flat(tree: Mapping) -> dict[str, Any]:
  """{'a/b/c': leaf} view of a nested parameter dict."""
  return {_path(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflat(flat_tree: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat_tree.items()})


def trainable_paths(params: Mapping, patterns: Sequence[str]) -> set[str]:
  """Paths matched (fully) by any pattern; a pattern matching nothing is an error (typos)."""
  paths = list(flat(params))
  chosen = set()
  for pattern in patterns:
    regex = re.compile(pattern)
    hits = {p for p in paths if regex.fullmatch(p)}
    if not hits:
      raise ValueError(f"trainable pattern {pattern!r} matches no parameter")
    chosen |= hits
  return chosen


def stage_patterns(stage: str) -> tuple[str, ...]:
  if stage not in STAGE_TRAINABLE:
    raise ValueError(f"stage={stage!r} is not one of {sorted(STAGE_TRAINABLE)}")
  return STAGE_TRAINABLE[stage]


def partition(params: Mapping, trainable: set[str]) -> tuple[dict, dict]:
  """(trainable, frozen) sub-trees; together they hold every leaf exactly once."""
  items = flat(params)
  return (
    unflat({k: v for k, v in items.items() if k in trainable}),
    unflat({k: v for k, v in items.items() if k not in trainable}),
  )


def merge(trainable: Mapping, frozen: Mapping) -> dict:
  return unflat({**flat(frozen), **flat(trainable)})


def warmup_steps(total_steps: int, steps: int = 0, ratio: float = 0.0) -> int:
  """Explicit warm-up steps win; otherwise ceil(ratio * total), as HF Trainer computes it."""
  if steps > 0:
    return int(steps)
  return int(math.ceil(ratio * total_steps))


def learning_rate_schedule(
  lr: float,
  total_steps: int,
  *,
  schedule: str = "cosine_with_min_lr",
  warmup: int = 0,
  min_lr_ratio: float = 0.0,
) -> optax.Schedule:
  """Linear warm-up from 0, then cosine to min_lr_ratio * lr (0 for plain `cosine`)."""
  if schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={schedule!r} is not one of {SCHEDULES}")
  warmup = min(warmup, total_steps)
  if schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
    )
  end = lr * (min_lr_ratio if schedule == "cosine_with_min_lr" else 0.0)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end)


def decay_mask(tree: Mapping) -> dict:
  """True for leaves that take weight decay (matrices), False for norms and biases."""
  return unflat({k: k.rsplit("/", 1)[-1] in DECAY_LEAVES for k in flat(tree)})


def adamw(
  *,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.01,
  clip_norm: float = 1.0,
) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (decoupled decay on matrices only) at learning rate 1.

  The step multiplies the result by the scheduled rate of `state.step` (neo_jax.trainer.step), so
  the schedule is a pure function of the step count, also across skipped steps and restarts.
  """
  parts = []
  if clip_norm and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(1.0, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def from_config(opt: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and its schedule from `config.optimizer` (see configs/common.py)."""
  warm = warmup_steps(total_steps, opt.warmup_steps, opt.warmup_ratio)
  schedule = learning_rate_schedule(
    opt.lr, total_steps, schedule=opt.schedule, warmup=warm, min_lr_ratio=opt.min_lr_ratio
  )
  tx = adamw(
    b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, clip_norm=opt.clip_norm
  )
  return tx, schedule


def state_param_count(opt_state: Any) -> int:
  """Elements held by the optimizer state (to check frozen leaves have none)."""
  return sum(int(getattr(x, "size", 0)) for x in jax.tree.leaves(opt_state))
