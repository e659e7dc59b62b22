"""A tqdm bar over tensors: shown on a terminal for big checkpoints, silent in logs and tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool | None = None) -> Iterator[tqdm]:
  """`enabled=None` shows the bar only when stderr is a terminal."""
  bar = tqdm(
    total=total,
    desc=desc,
    unit="tensor",
    leave=False,
    dynamic_ncols=True,
    disable=None if enabled is None else not enabled,
  )
  try:
    yield bar
  finally:
    bar.close()
