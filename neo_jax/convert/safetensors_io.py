"""Safetensors files read and written directly: memory-mapped, streaming, no pickle.

The format: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
raw little-endian tensor bytes, offsets relative to the end of the header. Parsing it here
(instead of through a framework) gives bf16 as `ml_dtypes.bfloat16` numpy arrays, error
messages that name the file and the tensor, and writes that stream one tensor at a time, so
converting a model never holds a second copy of it.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from neo_jax.errors import UserError

# safetensors dtype name <-> numpy dtype (little-endian).
_DTYPES = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U64": np.dtype("<u8"),
  "U32": np.dtype("<u4"),
  "U16": np.dtype("<u2"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

# Headers larger than this are not safetensors files (the reference library uses 100 MB).
_MAX_HEADER_BYTES = 100_000_000


def dtype_name(dtype: np.dtype) -> str:
  """The safetensors name of a numpy dtype ("BF16", "F32", ...)."""
  dtype = np.dtype(dtype)
  if dtype not in _NAMES:
    raise UserError(f"dtype {dtype} cannot be stored in safetensors")
  return _NAMES[dtype]


class SafetensorsFile:
  """A read-only, memory-mapped safetensors file; `file[name]` is a zero-copy numpy view."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      with open(self.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
          raise self._corrupt(f"{size} bytes, too short for a header")
        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
      raise UserError(f"{self.path}: file not found") from None
    except OSError as e:
      raise UserError(f"{self.path}: cannot read ({e.strerror or e})") from None
    (header_len,) = struct.unpack("<Q", self._map[:8])
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
      raise self._corrupt(f"header length {header_len} does not fit in a {size}-byte file")
    try:
      header = json.loads(bytes(self._map[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise self._corrupt(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
      raise self._corrupt("header is not a JSON object")
    self.metadata: dict = header.pop("__metadata__", None) or {}
    self._data_start = 8 + header_len
    data_bytes = size - self._data_start
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
    for name, entry in header.items():
      self._entries[name] = self._check_entry(name, entry, data_bytes)

  def _corrupt(self, why: str) -> UserError:
    return UserError(f"{self.path}: not a valid safetensors file: {why}")

  def _check_entry(
    self, name: str, entry: Any, data_bytes: int
  ) -> tuple[np.dtype, tuple[int, ...], int]:
    try:
      dtype = _DTYPES[entry["dtype"]]
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise self._corrupt(f"tensor {name}: bad header entry {entry!r}") from None
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_bytes or end - begin != expected:
      raise self._corrupt(
        f"tensor {name}: offsets [{begin}, {end}) do not hold {entry['dtype']} "
        f"{list(shape)} inside {data_bytes} data bytes (file truncated?)"
      )
    return dtype, shape, begin

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def __getitem__(self, name: str) -> np.ndarray:
    dtype, shape, begin = self._entries[name]
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._data_start + begin)
    return array.reshape(shape)

  def read(self, name: str, index: tuple = ()) -> np.ndarray:
    """A copy of `file[name][index]`; the file's pages it touched are handed back to the OS, so
    reading one slice of each tensor keeps only those slices in memory (sharded loading)."""
    out = np.array(self[name][index])
    dtype, shape, begin = self._entries[name]
    start = self._data_start + begin
    length = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    page = mmap.PAGESIZE
    aligned = start - start % page
    if length and hasattr(self._map, "madvise"):
      self._map.madvise(mmap.MADV_DONTNEED, aligned, start + length - aligned)
    return out


class TensorSpec:
  """What a writer needs to lay out a tensor before computing it: name, shape, dtype."""

  def __init__(self, name: str, shape: Iterable[int], dtype: np.dtype):
    self.name, self.shape, self.dtype = name, tuple(int(d) for d in shape), np.dtype(dtype)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_safetensors(
  path: str | os.PathLike,
  specs: Iterable[TensorSpec],
  produce: Callable[[str], np.ndarray],
  metadata: Mapping[str, str] | None = None,
  on_tensor: Callable[[str], None] | None = None,
) -> None:
  """Writes tensors computed one at a time by `produce(name)`, in the order of `specs`.

  Tensors are laid out by decreasing itemsize, then name (as the reference library does), so
  every tensor is aligned to its itemsize.
  """
  specs = sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for spec in specs:
    header[spec.name] = {
      "dtype": dtype_name(spec.dtype),
      "shape": list(spec.shape),
      "data_offsets": [offset, offset + spec.nbytes],
    }
    offset += spec.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for spec in specs:
      array = np.ascontiguousarray(produce(spec.name))
      if array.shape != spec.shape or array.dtype != spec.dtype:
        raise ValueError(
          f"{spec.name}: produced {array.dtype} {list(array.shape)}, planned "
          f"{spec.dtype} {list(spec.shape)}"
        )
      f.write(array.reshape(-1).view(np.uint8))
      if on_tensor is not None:
        on_tensor(spec.name)
  os.replace(tmp, path)
