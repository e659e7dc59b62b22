"""What the CLI does with errors: one line and an exit status instead of a traceback.

Every command prints a user's mistake as one line on stderr,

    neo-jax COMMAND: error: <what is wrong>, <which file / key / step>; <what to do>

and exits with EXIT_USER_ERROR (2, as argparse does for a bad flag). A run that starts but
fails on its own terms (a non-finite loss under nan_policy=stop, too many skipped updates)
prints the same kind of line and exits with EXIT_RUN_FAILED (1). `--debug` (or
NEO_JAX_DEBUG=1) shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

EXIT_RUN_FAILED = 1
EXIT_USER_ERROR = 2
DEBUG_ENV = "NEO_JAX_DEBUG"
T = TypeVar("T")


class UserError(Exception):
  """Bad input from the user (a flag, a file, a checkpoint); the message names the thing."""


class RunError(RuntimeError):
  """A run that stopped because of what happened in it; the message names the step."""


def debug_enabled() -> bool:
  """NEO_JAX_DEBUG set to anything but "", "0", "false" or "no"."""
  return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(message: object, limit: int = 2000) -> str:
  """`message` with its whitespace runs (newlines included) collapsed, cut at `limit`."""
  text = re.sub(r"\s+", " ", str(message)).strip()
  return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_failure(error: BaseException, limit: int = 300) -> str:
  """A library's exception (orbax, tensorstore, json) as a short one-line reason."""
  text = str(error).split(" See full TensorStore details")[0].split(" [tensorstore_spec=")[0]
  text = re.sub(r'Error opening "\w+" driver: ', "", text)
  return one_line(f"{type(error).__name__}: {text}" if text else type(error).__name__, limit)


ABANDONED_READ = "Encountered error while reading array"  # orbax, on a shard read cut short


def _abandoned_read_report(exc_value: BaseException | None) -> bool:
  """A leftover of a failed orbax read: "Event loop is closed" from one of its threads, or one
  of its other shard reads closed unfinished (GeneratorExit, which orbax re-raises as an error
  when the coroutine is collected, possibly long after the failure was reported)."""
  if isinstance(exc_value, RuntimeError) and str(exc_value) == "Event loop is closed":
    return True
  return (
    isinstance(exc_value, Exception)
    and isinstance(exc_value.__cause__, GeneratorExit)
    and str(exc_value).startswith(ABANDONED_READ)
  )


def _install_abandoned_read_filters() -> None:
  """Drops, for good, the reports that an abandoned orbax read leaves behind after it has failed
  and been reported (threads ending, coroutines collected later, even at exit); every other
  report still reaches the previous hooks."""
  if getattr(threading.excepthook, "neo_jax_filter", False):
    return
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

  def on_thread(args: Any) -> None:
    if not _abandoned_read_report(args.exc_value):
      thread_hook(args)

  def on_unraisable(unraisable: Any) -> None:
    if not _abandoned_read_report(unraisable.exc_value):
      unraisable_hook(unraisable)

  on_thread.neo_jax_filter = True
  threading.excepthook, sys.unraisablehook = on_thread, on_unraisable


@contextlib.contextmanager
def quiet_failures() -> Iterator[None]:
  """Silences what a failed orbax read leaves behind (its other array reads end as "Exception
  ignored in <coroutine>" / "Event loop is closed" reports and asyncio log records) while the
  failure itself propagates to be reported once. With --debug nothing is silenced."""
  if debug_enabled():
    yield
    return
  _install_abandoned_read_filters()
  previous_hook = sys.unraisablehook
  # asyncio: abandoned tasks; absl: orbax's own error lines about a file it then does without
  logs = [logging.getLogger(name) for name in ("asyncio", "absl")]
  levels = [log.level for log in logs]
  sys.unraisablehook = lambda unraisable: None
  for log in logs:
    log.setLevel(logging.CRITICAL)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
      yield
  finally:
    sys.unraisablehook = previous_hook
    for log, level in zip(logs, levels):
      log.setLevel(level)


def read_or_reason(read: Callable[[], T]) -> tuple[T | None, str | None]:
  """(read(), None), or (None, a one-line reason) when it raises: a damaged file under orbax
  or tensorstore. The failed read's leftovers (abandoned coroutines, their threads) are
  finalised here, silenced, instead of surfacing later as stray tracebacks."""
  with quiet_failures():
    try:
      return read(), None
    except Exception as e:  # noqa: BLE001 -- whatever the damage, it is reported as a reason
      reason = describe_failure(e)
    gc.collect()  # `e` is gone: what it held is collected under the quiet hooks
  return None, reason
