"""Evaluation files: VQA and POPE JSONL layouts, and the built-in easy-vqa sets.

VQA file (JSONL, one question per line):

    {"image": "images/001.png", "question": "What color is the shape?", "answer": "red"}

`answer` may also be a list of acceptable answers (`answers` is accepted as the key too).

POPE file (JSONL, the layout of the POPE benchmark files):

    {"image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "label": "yes"}

(`question` / `answer` are accepted in place of `text` / `label`.) Other keys, such as
`question_id`, are carried into the predictions. Relative image paths are resolved against
`image_root`, by default the data file's directory.

Built-in: `easy-vqa:test` (or `easy-vqa:train`) reads easy-vqa from neo_jax.data; for POPE
only its yes/no questions are used.

Lines that cannot be used are skipped and counted by reason, never dropped silently; with
`strict` the first one raises a UserError that names the file and line. Blank lines are
ignored.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

from neo_jax.data.pipeline import read_vqa_eval
from neo_jax.errors import UserError

TASKS = ("vqa", "pope")
BUILTIN_PREFIX = "easy-vqa:"


@dataclasses.dataclass(frozen=True)
class EvalExample:
  """One question. `image` is a path or encoded bytes; `answers` the acceptable answers (VQA)
  or the one label (POPE)."""

  index: int  # line number in the file (1-based), or position in a built-in set
  image: str | bytes
  image_name: str  # as written in the file (for the predictions)
  question: str
  answers: tuple[str, ...]
  extra: dict = dataclasses.field(default_factory=dict)


class SkipLog:
  """Counts skipped inputs by reason and keeps the first message of each reason."""

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.counts: collections.Counter[str] = collections.Counter()
    self.first: dict[str, str] = {}

  def skip(self, reason: str, message: str) -> None:
    if self.strict:
      raise UserError(f"{message} (--strict)")
    self.counts[reason] += 1
    self.first.setdefault(reason, message)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    parts = [
      f"{reason} {n} (first: {self.first[reason]})" for reason, n in sorted(self.counts.items())
    ]
    return "; ".join(parts)


def _text(record: dict, keys: tuple[str, ...]) -> Any | None:
  for k in keys:
    if k in record:
      return record[k]
  return None


def _parse(record: Any, task: str) -> tuple[str, str, tuple[str, ...]]:
  """(image, question, answers) of one record; raises ValueError(reason, message)."""
  if not isinstance(record, dict):
    raise ValueError("not_object", f"expected a JSON object, got {type(record).__name__}")
  image = record.get("image")
  if not isinstance(image, str) or not image:
    raise ValueError("missing_field", 'no "image" path')
  if task == "vqa":
    question = _text(record, ("question", "text"))
    answer = _text(record, ("answer", "answers"))
    if isinstance(answer, str):
      answers = (answer,)
    elif isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
      answers = tuple(answer)
    else:
      raise ValueError("missing_field", 'no "answer" (a string or a list of strings)')
  else:
    question = _text(record, ("text", "question"))
    label = _text(record, ("label", "answer"))
    if not isinstance(label, str):
      raise ValueError("missing_field", 'no "label"')
    label = label.strip().lower()
    if label not in ("yes", "no"):
      raise ValueError("bad_label", f'label must be "yes" or "no", got {label!r}')
    answers = (label,)
  if not isinstance(question, str) or not question.strip():
    raise ValueError("missing_field", "no question text")
  return image, question, answers


def read_eval_file(
  path: str,
  task: str,
  *,
  image_root: str | None = None,
  skips: SkipLog | None = None,
  limit: int | None = None,
) -> list[EvalExample]:
  """Examples of a VQA or POPE JSONL file; unusable lines go to `skips`."""
  if task not in TASKS:
    raise UserError(f"unknown task {task!r}; choose one of {TASKS}")
  skips = skips if skips is not None else SkipLog()
  root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
  if image_root is not None and not os.path.isdir(image_root):
    raise UserError(f"--image-root {image_root}: no such directory")
  examples = []
  try:
    f = open(path, "rb")  # decoded line by line: one bad line is skipped, not the file
  except FileNotFoundError:
    raise UserError(f"{path}: no such data file") from None
  except IsADirectoryError:
    raise UserError(f"{path}: is a directory, expected a JSONL file") from None
  with f:
    for line_no, raw in enumerate(f, 1):
      if limit is not None and len(examples) >= limit:
        break
      if not raw.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        skips.skip("bad_json", f"{where}: not UTF-8 text (byte {e.start}: {e.reason})")
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        skips.skip("bad_json", f"{where}: not valid JSON ({e.msg})")
        continue
      try:
        image, question, answers = _parse(record, task)
      except ValueError as e:
        reason, message = e.args
        skips.skip(reason, f"{where}: {message}")
        continue
      image_path = image if os.path.isabs(image) else os.path.join(root, image)
      if not os.path.isfile(image_path):
        skips.skip("missing_image", f"{where}: image not found: {image_path}")
        continue
      extra = {
        k: v
        for k, v in record.items()
        if k not in ("image", "question", "text", "answer", "answers", "label")
      }
      examples.append(EvalExample(line_no, image_path, image, question, answers, extra))
  return examples


def read_builtin(name: str, task: str, limit: int | None = None) -> list[EvalExample]:
  """easy-vqa:SPLIT as evaluation examples (POPE: its yes/no questions only)."""
  split = name[len(BUILTIN_PREFIX) :]
  if split not in ("train", "test"):
    raise UserError(f"--data {name}: unknown split {split!r}; use easy-vqa:test or easy-vqa:train")
  examples = []
  for i, ex in enumerate(read_vqa_eval(split)):
    if limit is not None and len(examples) >= limit:
      break
    if task == "pope" and ex.answer not in ("yes", "no"):
      continue
    examples.append(EvalExample(i, ex.image, ex.id, ex.question, (ex.answer,), {"id": ex.id}))
  return examples


def read_examples(
  data: str,
  task: str,
  *,
  image_root: str | None = None,
  skips: SkipLog | None = None,
  limit: int | None = None,
) -> list[EvalExample]:
  """A data file or a built-in name (`easy-vqa:test`)."""
  if data.startswith(BUILTIN_PREFIX):
    return read_builtin(data, task, limit)
  return read_eval_file(data, task, image_root=image_root, skips=skips, limit=limit)
