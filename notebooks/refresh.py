"""Runs every notebook here top to bottom (full mode, not the tests' fast one) and writes it
back with its outputs, so that GitHub and Colab show the plots without running anything.

    make notebooks            (= .venv/bin/python notebooks/refresh.py [NAME.ipynb ...])

Each notebook records a digest of its code cells in its metadata (`neo_jax.code_sha256`);
tests/test_notebooks.py checks that the committed outputs belong to the committed code.
"""

from __future__ import annotations

import datetime
import hashlib
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
CELL_TIMEOUT_S = 1800


def code_digest(nb: nbformat.NotebookNode) -> str:
  """sha256 of the code cells' sources, in order (what the outputs were made from)."""
  sources = "\n\x00\n".join(c.source for c in nb.cells if c.cell_type == "code")
  return hashlib.sha256(sources.encode()).hexdigest()


def refresh(path: pathlib.Path) -> float:
  """Executes `path` in a fresh kernel from its own directory and saves it with outputs."""
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    record_timing=False,
    resources={"metadata": {"path": str(path.parent)}},
  )
  start = time.perf_counter()
  client.execute()
  seconds = time.perf_counter() - start
  nb.metadata["neo_jax"] = {
    "code_sha256": code_digest(nb),
    "refreshed": datetime.date.today().isoformat(),
    "seconds": round(seconds),
  }
  nbformat.validate(nb)
  nbformat.write(nb, path)
  return seconds


def main(names: list[str]) -> int:
  paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
  for path in paths:
    print(f"{path.name}: running ...", flush=True)
    print(f"{path.name}: refreshed in {refresh(path):.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
