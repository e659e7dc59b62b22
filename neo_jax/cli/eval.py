"""`neo-jax eval`: VQA exact-match accuracy or POPE metrics of a checkpoint on local files.

Answers come from greedy decoding with NEO's evaluation prompt. Writes one JSON line per
sample (--out) and the metrics as JSON (--metrics, default: next to --out), and prints them.
File layouts and the answer normalisation: neo_jax/evals/examples.py and metrics.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from neo_jax.cli.generate import add_model_arguments
from neo_jax.errors import UserError
from neo_jax.evals.evaluate import ModelPredictor, evaluate
from neo_jax.evals.examples import TASKS, SkipLog, read_examples
from neo_jax.inference.loading import load_for_inference


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = (
    "data layouts (JSONL, one sample per line):\n"
    '  vqa:  {"image": PATH, "question": TEXT, "answer": TEXT or [TEXT, ...]}\n'
    '  pope: {"image": PATH, "text": QUESTION, "label": "yes" | "no"}\n'
    "  relative image paths are resolved against --image-root (default: the file's folder);\n"
    "  --data easy-vqa:test (or easy-vqa:train) uses the built-in easy-vqa questions.\n"
    "vqa accuracy: exact match after normalisation (lower case, punctuation and articles\n"
    "  removed, number words -> digits). pope: the first yes/no word of the answer is its\n"
    "  label; accuracy, precision, recall, F1 ('yes' positive) and yes-ratio.\n"
    "Unusable lines and images are skipped and counted in the metrics (--strict: fail)."
  )
  add_model_arguments(parser)
  parser.add_argument("--task", required=True, choices=TASKS, help="what to measure")
  parser.add_argument(
    "--data",
    required=True,
    metavar="FILE",
    help="JSONL file in the task's layout, or easy-vqa:test / easy-vqa:train",
  )
  parser.add_argument(
    "--image-root",
    default=None,
    metavar="DIR",
    help="folder that relative image paths start from (default: the data file's folder)",
  )
  parser.add_argument(
    "--batch-size", type=int, default=8, help="questions answered together (default: %(default)s)"
  )
  parser.add_argument(
    "--max-new-tokens", type=int, default=32, help="longest answer in tokens (default: %(default)s)"
  )
  parser.add_argument(
    "--limit", type=int, default=None, help="evaluate only the first N usable samples"
  )
  parser.add_argument(
    "--out",
    default=None,
    metavar="FILE",
    help="per-sample predictions as JSONL (default: eval_TASK.jsonl in the current folder)",
  )
  parser.add_argument(
    "--metrics",
    default=None,
    metavar="FILE",
    help="metrics as JSON (default: --out with .metrics.json)",
  )
  parser.add_argument(
    "--strict",
    action="store_true",
    help="fail at the first unusable line or image instead of skipping it",
  )
  parser.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="progress bar (default: only on a terminal)",
  )


def _metrics_path(out: str) -> str:
  stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
  return stem + ".metrics.json"


def format_metrics(metrics: dict) -> str:
  keys = (
    ("accuracy",)
    if metrics["task"] == "vqa"
    else ("accuracy", "precision", "recall", "f1", "yes_ratio")
  )
  numbers = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)
  return (
    f"{metrics['task']}: {numbers}  ({metrics['examples']} samples, "
    f"{metrics['skipped_total']} skipped)"
  )


def run(args: argparse.Namespace) -> int:
  for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
    if value < 1:
      raise UserError(f"{flag} must be >= 1, got {value}")
  if args.limit is not None and args.limit < 1:
    raise UserError(f"--limit must be >= 1, got {args.limit}")
  out = args.out or f"eval_{args.task}.jsonl"
  metrics_out = args.metrics or _metrics_path(out)
  for path in (out, metrics_out):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
      raise UserError(f"{path}: folder {folder} does not exist")

  skips = SkipLog(strict=args.strict)
  examples = read_examples(
    args.data, args.task, image_root=args.image_root, skips=skips, limit=args.limit
  )
  if not examples:
    raise UserError(
      f"--data {args.data}: no usable samples" + (f" ({skips.summary()})" if skips.total else "")
    )
  model = load_for_inference(args.checkpoint, dtype=args.dtype, tokenizer_dir=args.tokenizer)
  predictor = ModelPredictor(
    model.params,
    model.config,
    model.tokenizer,
    max_new_tokens=args.max_new_tokens,
    batch_size=args.batch_size,
    min_pixels=args.min_pixels,
    max_pixels=args.max_pixels,
  )
  progress = sys.stderr.isatty() if args.progress is None else args.progress
  with open(out, "w", encoding="utf-8") as f:

    def write(record: dict) -> None:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      f.flush()

    result = evaluate(
      examples,
      predictor,
      args.task,
      batch_size=args.batch_size,
      skips=skips,
      progress=progress,
      on_record=write,
    )
  metrics = {**result.metrics, "data": args.data, "checkpoint": args.checkpoint, "predictions": out}
  with open(metrics_out, "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=2)
    f.write("\n")
  if skips.total:
    print(f"warning: skipped {skips.total} samples: {skips.summary()}", file=sys.stderr)
  print(format_metrics(metrics))
  print(f"predictions: {out}\nmetrics: {metrics_out}")
  return 0
