"""Scoring generated answers: VQA exact match and POPE's yes/no metrics.

VQA answer normalisation (applied to the prediction and to every reference answer alike, in
the spirit of the standard VQA evaluation):

  1. lower case; newlines and tabs become spaces
  2. commas inside numbers are dropped ("1,000" -> "1000"); a period between two digits is kept
     ("3.5"); apostrophes are dropped ("don't" -> "dont", "man's" -> "mans")
  3. every other punctuation character becomes a space ("red/blue" -> "red blue", "yes." -> "yes")
  4. number words zero..twenty (and "none") become digits ("two" -> "2", "none" -> "0")
  5. the articles a, an, the are removed
  6. words are joined by single spaces

A prediction is correct when its normalised form equals the normalised form of any reference
answer (a file may give one answer or a list of acceptable ones).

POPE: a prediction counts as "yes" or "no" by its first word (after the normalisation above)
that is "yes" or "no"; one with neither word is "unanswered": wrong for accuracy and not a
positive prediction for precision and recall. With "yes" as the positive class:
precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R) (0 when undefined),
yes-ratio = share of all predictions that are "yes".
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

NUMBER_WORDS = {
  "none": "0",
  "zero": "0",
  "one": "1",
  "two": "2",
  "three": "3",
  "four": "4",
  "five": "5",
  "six": "6",
  "seven": "7",
  "eight": "8",
  "nine": "9",
  "ten": "10",
  "eleven": "11",
  "twelve": "12",
  "thirteen": "13",
  "fourteen": "14",
  "fifteen": "15",
  "sixteen": "16",
  "seventeen": "17",
  "eighteen": "18",
  "nineteen": "19",
  "twenty": "20",
}
ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = set(string.punctuation + "“”‘’«»…–—·¿¡") - {"'"}
_DECIMAL_MARK = "\x00"  # stands in for a kept decimal point while punctuation is removed


def normalize_vqa_answer(text: str) -> str:
  """The normalised form used for exact match (see the module docstring)."""
  t = text.lower().replace("\n", " ").replace("\t", " ")
  t = re.sub(r"(?<=\d),(?=\d)", "", t)
  t = re.sub(r"(?<=\d)\.(?=\d)", _DECIMAL_MARK, t)
  t = t.replace("'", "").replace("’", "")
  t = "".join(" " if c in _PUNCTUATION else c for c in t)
  t = t.replace(_DECIMAL_MARK, ".")
  words = [NUMBER_WORDS.get(w, w) for w in t.split()]
  return " ".join(w for w in words if w not in ARTICLES)


def vqa_correct(prediction: str, answers: Sequence[str]) -> bool:
  pred = normalize_vqa_answer(prediction)
  return any(pred == normalize_vqa_answer(a) for a in answers)


def vqa_metrics(correct: Iterable[bool]) -> dict[str, float]:
  hits = [bool(c) for c in correct]
  n = len(hits)
  return {"examples": n, "correct": sum(hits), "accuracy": sum(hits) / n if n else 0.0}


def yes_no(text: str) -> str | None:
  """ "yes" / "no" by the first such word of the answer, None when it has neither."""
  for word in normalize_vqa_answer(text).split():
    if word in ("yes", "no"):
      return word
  return None


def pope_metrics(predicted: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
  """POPE metrics from predicted labels ("yes" / "no" / None) and true labels ("yes" / "no")."""
  if len(predicted) != len(labels):
    raise ValueError(f"{len(predicted)} predictions for {len(labels)} labels")
  tp = sum(p == "yes" and y == "yes" for p, y in zip(predicted, labels))
  fp = sum(p == "yes" and y == "no" for p, y in zip(predicted, labels))
  tn = sum(p == "no" and y == "no" for p, y in zip(predicted, labels))
  fn = sum(p != "yes" and y == "yes" for p, y in zip(predicted, labels))
  n = len(labels)
  ratio = lambda a, b: a / b if b else 0.0
  precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
  return {
    "examples": n,
    "accuracy": ratio(tp + tn, n),
    "precision": precision,
    "recall": recall,
    "f1": ratio(2 * precision * recall, precision + recall),
    "yes_ratio": ratio(sum(p == "yes" for p in predicted), n),
    "tp": tp,
    "fp": fp,
    "tn": tn,
    "fn": fn,
    "unanswered": sum(p is None for p in predicted),
  }
