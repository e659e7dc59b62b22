"""The code is lint-clean and formatted as pyproject's [tool.ruff] says (`ruff check`,
`ruff format --check` over the repository): the same check a contributor runs before a commit."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args, "--no-cache", str(ROOT)],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )


def test_ruff_check_is_clean():
  result = _ruff("check")
  assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_every_file_as_it_is():
  result = _ruff("format", "--check")
  assert result.returncode == 0, result.stdout + result.stderr
