"""`neo-jax compare-preference`: DPO and ACPO from the same SFT checkpoint, one plot.

    neo-jax compare-preference --sft workdir/tiny_vqa_sft --out workdir/compare_preference

Runs the preference config (default configs/preference.py:tiny) twice from the SFT run, once with
plain DPO (loss "sigmoid") and once with ACPO, each in OUT/<loss>/ (an existing run directory
resumes, so a finished run is only read back). Then the SFT start and every run answer the same
easy-vqa test questions (`--questions`, default 1000; neo_jax.evals.easy_vqa), and it writes

    OUT/compare.png    rewards/chosen and logps/chosen over the steps for both (the likelihood
                       displacement picture: under DPO the chosen log-prob tends to fall even
                       as the margin grows), labelled with each run's VQA accuracy
    OUT/summary.json   the final metrics of each run (loss, margins, accuracies, vqa/accuracy),
                       and the question set every accuracy is on

`--config.FIELD=VALUE` overrides apply to both runs (e.g. --config.total_steps=60).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from neo_jax import run_dir, stage
from neo_jax.cli.train import setup_logging
from neo_jax.data.pipeline import read_vqa_eval
from neo_jax.errors import UserError
from neo_jax.evals.easy_vqa import log_score, question_set, score_run
from neo_jax.objectives.preference.compare import LABELS, LOSSES, plot, run_configs, summary
from neo_jax.trainer.metrics import read_jsonl

ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--sft",
    required=True,
    metavar="DIR",
    help="the SFT run directory (or any NEO checkpoint) both runs start from",
  )
  parser.add_argument(
    "--out",
    required=True,
    metavar="DIR",
    help="output directory: a run directory per loss, compare.png, summary.json",
  )
  parser.add_argument(
    "--config",
    default=os.path.join("configs", "preference.py") + ":tiny",
    metavar="FILE[:ARG]",
    help="preference config (default: %(default)s)",
  )
  parser.add_argument(
    "--losses",
    default=",".join(LOSSES),
    help="comma-separated preference losses to run (default: %(default)s)",
  )
  parser.add_argument(
    "--questions",
    type=int,
    default=1000,
    metavar="N",
    help="easy-vqa test questions every run (and the SFT start) answers; 0: "
    "none (default: %(default)s)",
  )


def run(args: argparse.Namespace) -> int:
  setup_logging("INFO")
  if args.questions < 0:
    raise UserError(f"--questions={args.questions} must be >= 0")
  losses = [x.strip() for x in args.losses.split(",") if x.strip()]
  configs = run_configs(
    args.config, args.sft, args.out, losses, getattr(args, "config_overrides", [])
  )
  os.makedirs(args.out, exist_ok=True)
  histories, summaries = {}, {}
  for loss, config in configs.items():
    config.eval.vqa_examples = 0  # every run is scored below, on the same questions
    logging.getLogger("neo_jax.train").info("compare-preference: %s in %s", loss, config.workdir)
    result = stage.train(config)
    if result.status != "completed":
      print(
        f"neo-jax compare-preference: {loss} stopped at step {result.step} "
        f"({result.status}); run the same command to resume",
        file=sys.stderr,
      )
      return 1
  examples = read_vqa_eval("test", args.questions) if args.questions else []
  scores = {}
  if examples:
    scores["sft"] = score_run(args.sft, len(examples), examples=examples)
    for loss, config in configs.items():
      scores[loss] = score_run(config.workdir, len(examples), examples=examples)
      log_score(config.workdir, config.total_steps, scores[loss])
  for loss, config in configs.items():
    # the whole run from its log (a resumed run's history holds only its own steps)
    histories[loss] = read_jsonl(os.path.join(config.workdir, run_dir.METRICS_FILE))
    summaries[loss] = summary(histories[loss])
  if examples:
    summaries["sft"] = {"vqa/accuracy": scores["sft"]["accuracy"]}
    summaries["question_set"] = question_set(examples)
  png = os.path.join(args.out, "compare.png")
  plot(histories, png)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summaries, f, indent=2)
  for loss, values in summaries.items():
    if isinstance(values, dict):
      shown = ", ".join(
        f"{k.split('/', 1)[-1]} {v:.4g}" for k, v in values.items() if v is not None
      )
      print(f"{LABELS.get(loss, loss)}: {shown}")
  if examples:
    print(
      f"VQA accuracy on the same {len(examples)} questions ({summaries['question_set']}): "
      + ", ".join(f"{LABELS.get(k, k)} {v['accuracy']:.1%}" for k, v in scores.items())
    )
  print(f"neo-jax compare-preference: wrote {png}", file=sys.stderr)
  return 0
