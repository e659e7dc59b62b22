"""A user's own JSONL (or JSON array) file plus an image folder, read with no build step.

The file is indexed once (byte offsets of the non-blank lines, a fast scan), and records are
parsed on access, so a grain pipeline reads it with random access like any other source. A
line that does not parse becomes an `invalid_json` error record (skipped and counted later),
never an exception.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from neo_jax.data.records import record_from_json, record_from_json_line


class JsonlSource:
  """Random-access records of a `.jsonl` file (one JSON object per line) or a `.json` file
  holding one array (LLaVA's format). Image paths resolve against `image_root` (default: the
  file's directory). Picklable: worker processes reopen the file."""

  def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"data file not found: {self.path}")
    self.image_root = str(image_root) if image_root is not None else str(self.path.parent)
    if image_root is not None and not os.path.isdir(self.image_root):
      raise FileNotFoundError(f"image folder not found: {self.image_root}")
    self._array: list | None = None
    self._offsets: np.ndarray | None = None  # byte offset of each record's line, and the end
    self._line_numbers: np.ndarray | None = None  # 1-based, for messages
    self._fd: int | None = None
    if self._is_json_array():
      self._array = self._load_array()
    else:
      self._offsets, self._line_numbers = self._index_lines()

  def _is_json_array(self) -> bool:
    with open(self.path, "rb") as f:
      head = f.read(4096).lstrip()
    return self.path.suffix == ".json" and head.startswith(b"[")

  def _load_array(self) -> list:
    with open(self.path, "rb") as f:
      try:
        data = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
          f"{self.path}: not valid JSON ({e}); use JSONL to skip bad lines instead"
        ) from None
    return data

  def _index_lines(self) -> tuple[np.ndarray, np.ndarray]:
    starts, ends, numbers = [], [], []
    pos = 0
    with open(self.path, "rb") as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          starts.append(pos)
          ends.append(pos + len(line))
          numbers.append(number)
        pos += len(line)
    return np.stack([np.asarray(starts, np.int64), np.asarray(ends, np.int64)], -1).reshape(
      -1, 2
    ), np.asarray(numbers, np.int64)

  def __len__(self) -> int:
    return len(self._array) if self._array is not None else len(self._offsets)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if self._array is not None:
      return record_from_json(self._array[index], self.image_root, f"{self.path.name}[{index}]")
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    start, end = (int(x) for x in self._offsets[index])
    line = os.pread(self._fd, end - start, start)  # positional: safe from several threads
    record_id = f"{self.path.name}:{int(self._line_numbers[index])}"
    return record_from_json_line(line, self.image_root, record_id)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fd"] = None
    return state

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)

  def __repr__(self) -> str:
    return f"JsonlSource({str(self.path)!r}, {len(self)} records)"
