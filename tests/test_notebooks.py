"""The Colab notebooks run top to bottom on CPU (NEO_JAX_NOTEBOOK_FAST=1: a handful of steps).

Each notebook executes in a fresh kernel from notebooks/ (as `jupyter` started there would);
any cell that raises fails the test. Committed notebooks carry the outputs of a full run
(`make notebooks`: plots visible on GitHub and Colab), made from the committed code.
"""

import importlib.util
import os
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; fast mode needs well under a minute for most


def _refresh_module():
  """notebooks/refresh.py (what `make notebooks` runs)."""
  spec = importlib.util.spec_from_file_location(
    "notebook_refresh", ROOT / "notebooks" / "refresh.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_notebooks_are_there():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "native_rope.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_the_outputs_of_its_own_code(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code), f"{path.name}: run `make notebooks`"
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"], path.name
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, f"{path.name}: no plot in the committed outputs"
  assert "fast mode: True" not in "".join(o.get("text", "") for o in outputs), (
    f"{path.name}: committed from a fast run; `make notebooks` runs the full one"
  )
  recorded = nb.metadata.get("neo_jax", {}).get("code_sha256")
  assert recorded == _refresh_module().code_digest(nb), (
    f"{path.name}: the code changed since its outputs were made; run `make notebooks`"
  )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, neo_cache, tmp_path, monkeypatch):
  monkeypatch.setenv("NEO_JAX_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's run directories
  monkeypatch.setenv(
    "PYTHONPATH",
    os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    ),
  )
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(path.parent)}},
  )
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError at the first cell that raises
  print(f"{path.name}: {time.perf_counter() - start:.0f} s")
  errors = [
    o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
  ]
  assert not errors
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
