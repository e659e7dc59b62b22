"""`neo-jax compare-preference`: DPO and ACPO from the same SFT checkpoint, one plot.

    neo-jax compare-preference --sft workdir/tiny_vqa_sft --out workdir/compare_preference

Runs the preference config (default configs/tiny_vqa_acpo.py) twice from the SFT run, once with
plain DPO (loss "sigmoid") and once with ACPO, each in OUT/<loss>/ (an existing run directory
resumes, so a finished run is only read back). Then writes

    OUT/compare.png    rewards/chosen and logps/chosen over the steps for both (the likelihood
                       displacement picture: under DPO the chosen log-prob tends to fall even
                       as the margin grows), titled with the held-out VQA accuracy after each
    OUT/summary.json   the final metrics of each run (loss, margins, accuracies, vqa/accuracy)

`--config.FIELD=VALUE` overrides apply to both runs (e.g. --config.total_steps=60).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Mapping, Sequence

ACCEPTS_CONFIG_OVERRIDES = True

LOSSES = ("sigmoid", "acpo")
LABELS = {"sigmoid": "DPO", "acpo": "ACPO", "sft": "SFT (start)"}
PLOTTED = ("train/rewards/chosen", "train/logps/chosen")
SUMMARY_KEYS = ("train/loss", "train/rewards/chosen", "train/rewards/rejected",
                "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen",
                "train/logps/rejected", "train/acpo/alpha_mean", "eval/loss", "vqa/accuracy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--sft", required=True, metavar="DIR",
                      help="the SFT run directory (or any NEO checkpoint) both runs start from")
  parser.add_argument("--out", required=True, metavar="DIR",
                      help="output directory: a run directory per loss, compare.png, "
                           "summary.json")
  parser.add_argument("--config", default=os.path.join("configs", "tiny_vqa_acpo.py"),
                      metavar="FILE[:ARG]", help="preference config (default: %(default)s)")
  parser.add_argument("--losses", default=",".join(LOSSES),
                      help="comma-separated preference losses to run (default: %(default)s)")


def run_configs(spec: str, sft: str, out: str, losses: Sequence[str],
                overrides: Sequence[str] = ()) -> dict[str, Any]:
  """One config per loss: the same start, steps and data; its own run directory."""
  from neo_jax.train import config_lib
  configs = {}
  for loss in losses:
    config = config_lib.load_config(spec, list(overrides))
    config.preference.loss = loss
    config.init.path = sft
    config.init.format = "run" if os.path.isdir(os.path.join(sft, "checkpoints")) else "neo"
    config.workdir = os.path.join(out, loss)
    config.name = f"{config.name}_{loss}"
    config_lib.validate(config)
    configs[loss] = config
  return configs


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
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
      steps, values = _series(history, key)
      vqa = last_value(history, "vqa/accuracy")
      label = LABELS.get(loss, loss) + (f" (VQA {100 * vqa:.0f}%)" if vqa is not None else "")
      ax.plot(steps, values, label=label)
    ax.axhline(0.0, color="grey", lw=0.5) if key.endswith("rewards/chosen") else None
    ax.set_xlabel("step")
    ax.set_title(key.removeprefix("train/"))
    ax.legend()
  fig.suptitle("preference training from the same SFT checkpoint")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(args: argparse.Namespace) -> int:
  from neo_jax.train.cli import _setup_logging
  from neo_jax.train.metrics import read_jsonl
  from neo_jax.train.trainer import Trainer
  _setup_logging("INFO")
  losses = [x.strip() for x in args.losses.split(",") if x.strip()]
  configs = run_configs(args.config, args.sft, args.out,
                        losses, getattr(args, "config_overrides", []))
  os.makedirs(args.out, exist_ok=True)
  histories, summary = {}, {}
  for loss, config in configs.items():
    logging.getLogger("neo_jax.train").info("compare-preference: %s in %s", loss,
                                            config.workdir)
    result = Trainer(config).run()
    if result.status != "completed":
      print(f"neo-jax compare-preference: {loss} stopped at step {result.step} "
            f"({result.status}); run the same command to resume", file=sys.stderr)
      return 1
    # the whole run from its log (a resumed run's history holds only its own steps)
    histories[loss] = read_jsonl(os.path.join(config.workdir, "metrics.jsonl"))
    summary[loss] = {k: last_value(histories[loss], k) for k in SUMMARY_KEYS}
  sft_log = os.path.join(args.sft, "metrics.jsonl")
  if os.path.isfile(sft_log):  # where both started, when the SFT run evaluated it
    summary["sft"] = {"vqa/accuracy": last_value(read_jsonl(sft_log), "vqa/accuracy")}
  png = os.path.join(args.out, "compare.png")
  plot(histories, png)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  for loss, values in summary.items():
    shown = ", ".join(f"{k.split('/', 1)[-1]} {v:.4g}" for k, v in values.items()
                      if v is not None)
    print(f"{LABELS.get(loss, loss)}: {shown}")
  print(f"neo-jax compare-preference: wrote {png}", file=sys.stderr)
  return 0
