"""The Colab notebooks run top to bottom on CPU (NEO_JAX_NOTEBOOK_FAST=1: a handful of steps).

Each notebook executes in a fresh kernel from notebooks/ (as `jupyter` started there would);
any cell that raises fails the test. Committed notebooks carry no outputs.
"""

import os
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; fast mode needs well under a minute for most


def test_the_notebooks_are_there():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "native_rope.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{path.name}: strip outputs before committing (cell {cell.get('id')})")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, neo_cache, tmp_path, monkeypatch):
  monkeypatch.setenv("NEO_JAX_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's run directories
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}})
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError at the first cell that raises
  print(f"{path.name}: {time.perf_counter() - start:.0f} s")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
