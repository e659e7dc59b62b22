"""Where built artefacts (tokenizer files, embedded TFDS data sets) live.

One directory, `$NEO_JAX_CACHE` or `~/.cache/neo_jax`, so tests can point it at a temporary
directory and nothing is ever downloaded: everything in it is built from installed packages.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator

CACHE_ENV = "NEO_JAX_CACHE"


def cache_root() -> pathlib.Path:
  """The cache directory (not created here)."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "neo_jax")
  return pathlib.Path(root)


@contextlib.contextmanager
def atomic_directory(final: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `final`, renamed onto it when the block succeeds.

  Concurrent builders (several processes of one job) never see a half-written directory; the
  first rename wins and the others discard their copy.
  """
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
  try:
    yield tmp
    try:
      os.rename(tmp, final)
    except OSError:
      if not final.exists():
        raise
  finally:
    if tmp.exists():
      _rmtree(tmp)


def _rmtree(path: pathlib.Path) -> None:
  import shutil

  shutil.rmtree(path, ignore_errors=True)
