"""Counters for skipped and dropped samples, and the warning / strict-mode policy.

Bad input never crashes a run and is never lost silently: each skipped record (and each good
one too large to pack) is counted under a reason, the first few per reason (per process) are
named in a logging warning, and
`strict=True` turns the first one into a `DataError` instead. Counts travel with each batch
from the process that packed it (grain workers included) and are summed by the iterator,
which exposes them through `iterator.stats()` for the training metrics.
"""

from __future__ import annotations

import collections
import logging

from neo_jax.errors import UserError

logger = logging.getLogger("neo_jax.data")

# Bad input: the record is skipped.
SKIP_REASONS = (
  "invalid_json",  # a JSONL line (or JSON file) that does not parse
  "bad_record",  # parsed, but not a caption / conversation / preference / text record
  "missing_file",  # an image path that does not exist
  "corrupt_image",  # undecodable or truncated image bytes
  "empty_image",  # zero-size image (file, bytes or array)
  "bad_aspect_ratio",  # max(h, w) / min(h, w) > 200
  "no_assistant_turn",  # a conversation with nothing to supervise
  "bad_conversation",  # unknown role, non-string content, prompt not ending with a user turn
  "image_tag_mismatch",  # number of <image> tags differs from the number of images
  "empty_text",  # empty caption / text / response
  "wrong_kind",  # e.g. a caption record in a preference pipeline
)
# Good input that cannot be packed: dropped (an image is never split).
DROP_REASONS = (
  "too_many_tokens",  # longer than a whole row (seq_len)
  "too_many_visual_tokens",  # more visual tokens than a row's visual budget
  "too_many_loss_tokens",  # more supervised tokens than the loss-token budget
)
COUNTERS = (
  "samples",  # samples packed (a split text counts once)
  "text_chunks",  # extra row pieces made by splitting long text samples
  "rows",  # non-empty rows emitted
  "batches",
  "tokens",  # non-padding tokens
  "visual_tokens",
  "loss_tokens",  # supervised positions (response tokens for preference rows)
)
STAT_KEYS = (
  tuple(f"skipped/{r}" for r in SKIP_REASONS)
  + tuple(f"dropped/{r}" for r in DROP_REASONS)
  + COUNTERS
)
STAT_INDEX = {k: i for i, k in enumerate(STAT_KEYS)}

MAX_NAMED_PER_REASON = 5


class DataError(UserError):
  """Strict mode: bad input found (the message names the record and the reason)."""


_named: collections.Counter = collections.Counter()


def report_skip(reason: str, detail: str, strict: bool) -> None:
  """Raises in strict mode; otherwise names the first few skips of each reason in a warning."""
  if reason not in SKIP_REASONS:
    raise ValueError(f"unknown skip reason {reason!r}")
  if strict:
    raise DataError(f"bad input ({reason}): {detail}")
  _name_first(reason, f"skipping a sample ({reason}): {detail}")


def report_drop(reason: str, detail: str) -> None:
  """Names the first few samples of each drop reason (too large for an empty row) in a
  warning; they are counted under dropped/<reason> either way."""
  if reason not in DROP_REASONS:
    raise ValueError(f"unknown drop reason {reason!r}")
  _name_first(reason, f"dropping a sample ({reason}): {detail}")


def _name_first(reason: str, message: str) -> None:
  _named[reason] += 1
  if _named[reason] <= MAX_NAMED_PER_REASON:
    suffix = (
      " (further ones of this kind are counted, not named)"
      if _named[reason] == MAX_NAMED_PER_REASON
      else ""
    )
    logger.warning("%s%s", message, suffix)


def reset_skip_warnings() -> None:
  """Names the next skips again (the count of named ones is per process)."""
  _named.clear()


def summarize(stats: dict[str, int]) -> str:
  """One line for logs: non-zero skip/drop counts and packing totals."""
  bad = {k: v for k, v in stats.items() if v and k.startswith(("skipped/", "dropped/"))}
  good = {k: stats.get(k, 0) for k in ("samples", "rows", "tokens", "visual_tokens", "loss_tokens")}
  return " ".join(f"{k}={v}" for k, v in {**good, **bad}.items())
