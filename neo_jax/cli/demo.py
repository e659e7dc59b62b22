"""`neo-jax demo`: the main job. Trains the tiny NEO on the embedded easy-vqa data on CPU.

    stage 1  pretrain  configs/pretrain.py:tiny                captions: vision from random weights
    stage 2  sft       configs/sft.py:tiny                     questions -> answers, from stage 1
    stage 3  dpo       configs/preference.py:tiny,loss=dpo     preference pairs, from stage 2
    stage 4  acpo      configs/preference.py:tiny              the same pairs and steps, from 2

Each stage is `neo_jax.stage.train` on the stage's own config, with its run directory
under the demo's work directory and its initial weights taken from the run it starts from.
DPO and ACPO both start from the SFT weights and read the same pairs in the same order, so
they differ only in the loss. After SFT, DPO and ACPO the model answers the same held-out
easy-vqa test questions greedily (neo_jax.evals.easy_vqa) and the exact-match accuracy is
printed and written to the stage's metrics. The demo ends with a loss plot (loss.png), the
DPO vs ACPO plot (preference.png: logps/chosen and rewards/chosen over the steps) and
summary.json in the work directory. Running it again skips finished stages and resumes an
interrupted one from its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from neo_jax import run_dir
from neo_jax import stage as stage_lib
from neo_jax.cli.train import setup_logging
from neo_jax.evals.easy_vqa import format_accuracy, log_score, score_run
from neo_jax.objectives.preference import compare
from neo_jax.trainer import config as config_lib
from neo_jax.trainer.hooks import StepInfo
from neo_jax.trainer.metrics import read_jsonl

# (stage, config file, its argument, the stage whose weights it starts from)
STAGES = (
  ("pretrain", "pretrain.py", "tiny", None),
  ("sft", "sft.py", "tiny", "pretrain"),
  ("dpo", "preference.py", "tiny,loss=dpo", "sft"),
  ("acpo", "preference.py", "tiny", "sft"),
)
PREFERENCE = ("dpo", "acpo")  # the same start, pairs and steps: only the loss differs
EVAL_AFTER = ("sft",) + PREFERENCE  # stages whose model answers the VQA test questions
CURVES = (
  "train/logps/chosen",
  "train/rewards/chosen",
  "train/logps/rejected",
  "train/rewards/rejected",
  "train/rewards/margins",
  "train/rewards/accuracies",
)
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"
PREFERENCE_PLOT = "preference.png"
DEFAULT_WORKDIR = "workdir/demo"
QUICK_WORKDIR = "workdir/demo_quick"
QUICK_STEPS = 3  # updates per stage with --quick
QUICK_QUESTIONS = 16

EPILOG = """\
Stages (each a `neo-jax train` config; every stage's run directory is WORKDIR/<stage>):
  1 pretrain  configs/pretrain.py:tiny                captions of the easy-vqa images, random start
  2 sft       configs/sft.py:tiny                     easy-vqa questions and answers, from 1
  3 dpo       configs/preference.py:tiny,loss=dpo     easy-vqa preference pairs (DPO), from 2
  4 acpo      configs/preference.py:tiny              the same pairs and steps (ACPO), from 2
Written to WORKDIR: <stage>/checkpoints, <stage>/metrics.jsonl, <stage>/tensorboard (view
with `tensorboard --logdir WORKDIR`), loss.png (every stage's loss), preference.png (DPO and
ACPO: logps/chosen and rewards/chosen over the steps) and summary.json (steps, times, losses,
VQA accuracy per stage on the same questions, the DPO and ACPO curves).
Running the same command again skips finished stages and resumes an unfinished one from its
newest checkpoint; delete WORKDIR to start over. Ctrl-C saves a checkpoint and stops."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.description = (
    "Train the tiny NEO on the embedded easy-vqa data on CPU: pretrain, "
    "SFT, then DPO and ACPO from the same SFT weights; print the held-out "
    "VQA accuracy of each."
  )
  parser.epilog = EPILOG
  parser.add_argument(
    "--workdir",
    default=None,
    help=f"where the stages' run directories, loss.png and summary.json go "
    f"(default {DEFAULT_WORKDIR}; {QUICK_WORKDIR} with --quick)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help=f"{QUICK_STEPS} updates per stage and {QUICK_QUESTIONS} test "
    "questions: checks that everything runs (minutes), learns nothing",
  )
  parser.add_argument(
    "--skip-preference", action="store_true", help="stop after SFT (no DPO / ACPO stages)"
  )
  parser.add_argument(
    "--questions",
    type=int,
    default=None,
    metavar="N",
    help="easy-vqa test questions to score (default 1000 of 9,673; "
    f"{QUICK_QUESTIONS} with --quick)",
  )
  parser.add_argument(
    "--configs",
    default=None,
    metavar="DIR",
    help="directory of the stage config files (default: the repository's configs/)",
  )


# --- stages -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
  """One stage of the demo: its config and where it reads its initial weights."""

  name: str
  config_path: str
  config_arg: str  # get_config's argument: the model and its variant
  workdir: str
  init_from: str | None  # the run directory of the stage it starts from


def default_configs_dir() -> str:
  """The repository's configs/ (the package is installed in place: `pip install -e .`)."""
  here = os.path.dirname(os.path.abspath(__file__))
  return os.path.normpath(os.path.join(here, "..", "..", "configs"))


def plan(
  workdir: str, configs_dir: str, skip_preference: bool, say: Callable[[str], None] = print
) -> list[Stage]:
  """The stages to run, in order; a missing preference config drops those stages with a
  message."""
  stages: list[Stage] = []
  for name, filename, arg, start in STAGES:
    if name in PREFERENCE and skip_preference:
      break
    path = os.path.join(configs_dir, filename)
    if not os.path.isfile(path):
      if name in PREFERENCE:
        say(f"stage {name}: {path} does not exist; the demo stops after SFT")
        break
      raise FileNotFoundError(f"{path}: stage config not found (see --configs)")
    init_from = os.path.join(workdir, start) if start else None
    stages.append(Stage(name, path, arg, os.path.join(workdir, name), init_from))
  return stages


def stage_config(stage: Stage, quick: bool) -> Any:
  """The stage's config file, pointed at the demo's run directories."""
  config = config_lib.load_config(f"{stage.config_path}:{stage.config_arg}")
  config.workdir = stage.workdir
  if stage.init_from is not None:
    config.init.path = stage.init_from
    config.init.format = "run"
  else:
    config.init.path = ""
  # the demo scores the test questions itself, on more of them, once the stage ends
  config.eval.vqa_examples = 0
  # the tiny model on one device, whatever the machine has (small batches gain nothing split)
  config.mesh.num_devices = 1
  if quick:
    config.total_steps = QUICK_STEPS
    config.log.every_steps = 1
    config.checkpoint.every_steps = QUICK_STEPS
    config.optimizer.warmup_steps = 1
    if config.eval.every_steps > 0:
      config.eval.every_steps = QUICK_STEPS
      config.eval.heldout_batches = 1
  config.log.progress_bar = sys.stderr.isatty()
  config_lib.validate(config)
  return config


def finished_step(workdir: str) -> int | None:
  """The newest checkpoint's step of a run directory, or None (no orbax needed)."""
  steps = run_dir.saved_steps(workdir)
  return steps[-1] if steps else None


class StepPrinter:
  """A trainer hook: one progress line per call, for when no progress bar can be drawn. The
  step time is the mean since the previous line, the run's first (compiling) step apart."""

  def __init__(self, name: str, total: int, say: Callable[[str], None]):
    self.name, self.total, self.say = name, total, say
    self.t0 = time.perf_counter()
    self._since, self._steps, self._seconds = 0, 0, 0.0

  def track(self, info: StepInfo) -> None:
    """Every step: the time of each update after the first."""
    if not info.first:
      self._steps += 1
      self._seconds += info.seconds

  def __call__(self, info: StepInfo) -> None:
    rate = f", {self._seconds / self._steps:.2f} s/step" if self._steps else ""
    self._steps, self._seconds = 0, 0.0
    self.say(
      f"  {self.name} step {info.step}/{self.total}: loss {info.metrics['loss']:.4f}"
      f"{rate}, {time.perf_counter() - self.t0:.0f} s"
    )


def run_stage(stage: Stage, config: Any, say: Callable[[str], None]) -> dict:
  """Trains one stage (or skips it when its last checkpoint is already there)."""
  done = finished_step(stage.workdir)
  if done is not None and done >= config.total_steps:
    say(f"stage {stage.name}: already finished (step {done}); skipped")
    return {"steps": done, "skipped": True}
  if done is not None:
    say(f"stage {stage.name}: resuming at step {done} of {config.total_steps}")
  t0 = time.perf_counter()
  trainer = stage_lib.build_trainer(config)
  if not config.log.progress_bar:
    printer = StepPrinter(stage.name, config.total_steps, say)
    trainer.add_hook(printer.track)
    trainer.add_hook(printer, config.log.every_steps, last=True)
  result = trainer.run()
  seconds = time.perf_counter() - t0
  if result.status != "completed":
    raise KeyboardInterrupt
  last = [r for r in result.history if "train/loss" in r]
  evals = [r for r in result.history if "eval/loss" in r]
  out = {"steps": result.step, "skipped": False, "seconds": round(seconds, 1)}
  if last:
    out["final_loss"] = last[-1]["train/loss"]
  if evals:
    out["heldout_loss"] = evals[-1]["eval/loss"]
  say(
    f"stage {stage.name}: {result.step} steps in {seconds / 60:.1f} min"
    + (f", loss {out['final_loss']:.4f}" if last else "")
    + (f", held-out loss {out['heldout_loss']:.4f}" if evals else "")
  )
  return out


# --- report -----------------------------------------------------------------------------------


def stage_curves(
  workdir: str, keys: Sequence[str] = ("train/loss", "eval/loss")
) -> dict[str, list[tuple[int, float]]]:
  """(step, value) series of a run's metrics.jsonl, one per key."""
  path = os.path.join(workdir, run_dir.METRICS_FILE)
  series: dict[str, dict[int, float]] = {k: {} for k in keys}
  if os.path.isfile(path):
    for record in read_jsonl(path):  # a resumed run appends: later records win
      for key, points in series.items():
        if record.get(key) is not None:
          points[int(record["step"])] = float(record[key])
  return {k: sorted(v.items()) for k, v in series.items()}


def plot_losses(stages: Sequence[Stage], path: str, accuracies: dict[str, float]) -> None:
  """One panel per stage (their losses are different quantities): train and held-out loss."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    curves = stage_curves(stage.workdir)
    for key, style in (("train/loss", "-"), ("eval/loss", "o--")):
      if curves[key]:
        steps, values = zip(*curves[key])
        ax.plot(steps, values, style, label=key.split("/")[0], markersize=4)
    title = stage.name
    if stage.name in accuracies:
      title += f" (VQA {accuracies[stage.name]:.1%})"
    ax.set_title(title)
    ax.set_xlabel("step")
    values = [v for c in curves.values() for _, v in c]
    if values and min(values) > 0 and max(values) > 10 * min(values):
      ax.set_yscale("log")  # pretrain and SFT fall from ln V; preference stays near ln 2
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0][0].set_ylabel("loss")
  fig.suptitle("tiny NEO on easy-vqa")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def preference_summary(stages: Sequence[Stage], records: dict) -> dict:
  """DPO against ACPO: where they started, their curves (CURVES) and their VQA accuracies on
  the same questions as SFT's."""
  runs = [s for s in stages if s.name in PREFERENCE]
  curves = {
    s.name: {k: [list(p) for p in v] for k, v in stage_curves(s.workdir, CURVES).items()}
    for s in runs
  }
  vqa = {name: records[name]["vqa"] for name in EVAL_AFTER if "vqa" in records.get(name, {})}
  sets = {v["question_set"] for v in vqa.values()}
  return {
    "start": runs[0].init_from,
    "steps": {s.name: records[s.name]["steps"] for s in runs},
    "curves": curves,
    "question_set": sets.pop() if len(sets) == 1 else None,
    "vqa_accuracy": {name: v["accuracy"] for name, v in vqa.items()},
  }


def format_preference(summary: dict) -> list[str]:
  """The DPO vs ACPO lines the demo prints."""
  label = lambda name: compare.LABELS.get(name, name)
  steps = ", ".join(f"{label(k)} {v}" for k, v in summary["steps"].items())
  lines = [f"DPO vs ACPO from the same SFT weights on the same pairs ({steps} updates):"]
  for key in ("train/logps/chosen", "train/rewards/chosen", "train/rewards/margins"):
    moves = []
    for name, curves in summary["curves"].items():
      points = curves.get(key) or []
      if points:
        moves.append(f"{label(name)} {points[0][1]:+.3f} -> {points[-1][1]:+.3f}")
    lines.append(f"  {key.removeprefix('train/'):<16} " + ";  ".join(moves))
  accuracies = ", ".join(
    f"{label(k) if k in PREFERENCE else k.upper()} {v:.1%}"
    for k, v in summary["vqa_accuracy"].items()
  )
  lines.append(f"  VQA exact match on the same questions ({summary['question_set']}): {accuracies}")
  return lines


def _read_summary(path: str) -> dict:
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _write_summary(path: str, summary: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
  t_start = time.perf_counter()
  say = lambda text: print(text, flush=True)
  workdir = args.workdir or (QUICK_WORKDIR if args.quick else DEFAULT_WORKDIR)
  questions = args.questions or (QUICK_QUESTIONS if args.quick else 1000)
  if questions < 1:
    raise ValueError(f"--questions={questions} must be >= 1")
  os.makedirs(workdir, exist_ok=True)
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  summary = _read_summary(summary_path)
  if summary and summary.get("quick") != args.quick:
    raise ValueError(
      f"{workdir} holds a {'quick' if summary.get('quick') else 'full'} demo; "
      "use another --workdir or delete it"
    )
  setup_logging("INFO", "neo_jax.train")
  stages = plan(workdir, args.configs or default_configs_dir(), args.skip_preference, say)
  configs = [stage_config(s, args.quick) for s in stages]  # fail on a bad config up front
  summary.update(
    quick=args.quick, workdir=os.path.abspath(workdir), stages=summary.get("stages", {})
  )
  say(
    f"neo-jax demo: {len(stages)} stages ({' -> '.join(s.name for s in stages)}) in "
    f"{os.path.abspath(workdir)}"
  )
  accuracies = {}
  for i, (stage, config) in enumerate(zip(stages, configs), 1):
    say(
      f"stage {i}/{len(stages)}: {stage.name} ({os.path.basename(stage.config_path)}:"
      f"{stage.config_arg}, "
      f"{config.total_steps} steps"
      + (f", from {stage.init_from}" if stage.init_from else ", random start")
      + ")"
    )
    record = summary["stages"].get(stage.name, {})
    ran = run_stage(stage, config, say)
    if not ran["skipped"]:
      record = {**ran, "config": f"{stage.config_path}:{stage.config_arg}"}
      record.pop("vqa", None)
    if stage.name in EVAL_AFTER:
      vqa = record.get("vqa")
      if vqa is None or vqa["questions"] != questions:
        say(f"stage {stage.name}: answering {questions} easy-vqa test questions")
        vqa = score_run(stage.workdir, questions)
        log_score(stage.workdir, ran["steps"], vqa)
        record["vqa"] = vqa
      say(format_accuracy(stage.name, vqa))
      accuracies[stage.name] = vqa["accuracy"]
    summary["stages"][stage.name] = record
    _write_summary(summary_path, summary)

  plot_path = os.path.join(workdir, PLOT_FILE)
  plot_losses(stages, plot_path, accuracies)
  plots = [os.path.abspath(plot_path)]
  if all(name in accuracies for name in PREFERENCE):
    summary["preference"] = preference_summary(stages, summary["stages"])
    preference_plot = os.path.join(workdir, PREFERENCE_PLOT)
    compare.plot(
      {
        s.name: read_jsonl(os.path.join(s.workdir, run_dir.METRICS_FILE))
        for s in stages
        if s.name in PREFERENCE
      },
      preference_plot,
    )
    plots.append(os.path.abspath(preference_plot))
    for line in format_preference(summary["preference"]):
      say(line)
  wall = time.perf_counter() - t_start
  final = stages[-1].name if stages[-1].name in accuracies else None
  summary.update(
    last_run_seconds=round(wall, 1),
    plot=plots[0],
    plots=plots,
    final_stage=stages[-1].name,
    vqa_accuracy=accuracies.get(final) if final else None,
  )
  _write_summary(summary_path, summary)
  say(
    f"plots: {', '.join(plots)}; summary: {os.path.abspath(summary_path)}; "
    f"TensorBoard: tensorboard --logdir {os.path.abspath(workdir)}"
  )
  if final:
    say(
      f"held-out VQA accuracy: {accuracies[final]:.1%} "
      f"({summary['stages'][final]['vqa']['questions']} easy-vqa test questions, "
      f"after {final})"
    )
  say(f"total wall time: {wall / 60:.1f} min")
  return 0
