"""DPO against ACPO from the same SFT checkpoint: the runs' configs, their summary and the plot.

The likelihood-displacement picture: under DPO the chosen answers' log-prob tends to fall even
as the margin grows; ACPO scales only the rejected reward to keep it up (docs/acpo.md). The
`neo-jax compare-preference` command (neo_jax/cli/compare_preference.py) runs the configs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from neo_jax import run_dir
from neo_jax.trainer import config as config_lib

LOSSES = ("sigmoid", "acpo")
LABELS = {"sigmoid": "DPO", "dpo": "DPO", "acpo": "ACPO", "sft": "SFT (start)"}
PLOTTED = ("train/rewards/chosen", "train/logps/chosen")
SUMMARY_KEYS = (
  "train/loss",
  "train/rewards/chosen",
  "train/rewards/rejected",
  "train/rewards/margins",
  "train/rewards/accuracies",
  "train/logps/chosen",
  "train/logps/rejected",
  "train/acpo/alpha_mean",
  "eval/loss",
  "vqa/accuracy",
)


def run_configs(
  spec: str, sft: str, out: str, losses: Sequence[str], overrides: Sequence[str] = ()
) -> dict[str, Any]:
  """One config per loss: the same start, steps and data; its own run directory."""
  configs = {}
  for loss in losses:
    config = config_lib.load_config(spec, list(overrides))
    config.preference.loss = loss
    config.init.path = sft
    config.init.format = (
      "run" if os.path.isdir(os.path.join(sft, run_dir.CHECKPOINT_DIR)) else "neo"
    )
    config.workdir = os.path.join(out, loss)
    config.name = f"{config.name}_{loss}"
    config_lib.validate(config)
    configs[loss] = config
  return configs


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  rows = [r for r in history if key in r]
  return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def last_value(history: Sequence[Mapping[str, Any]], key: str) -> Any:
  values = [r[key] for r in history if key in r]
  return float(values[-1]) if values else None


def plot(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str) -> None:
  """rewards/chosen and logps/chosen against the step, one line per loss."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(PLOTTED), figsize=(11, 4))
  for ax, key in zip(axes, PLOTTED):
    for loss, history in histories.items():
      steps, values = series(history, key)
      vqa = last_value(history, "vqa/accuracy")
      label = LABELS.get(loss, loss) + (f" (VQA {vqa:.1%})" if vqa is not None else "")
      ax.plot(steps, values, label=label)
    ax.axhline(0.0, color="grey", lw=0.5) if key.endswith("rewards/chosen") else None
    ax.set_xlabel("step")
    ax.set_title(key.removeprefix("train/"))
    ax.legend()
  fig.suptitle("preference training from the same SFT checkpoint")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The last value of each of SUMMARY_KEYS in a run's records (None where never logged)."""
  return {k: last_value(history, k) for k in SUMMARY_KEYS}
