"""TFDS builders (array_record, no TensorFlow) for the four record kinds, and their reader.

`build_tfds(kind, name, splits, data_dir)` writes records (records.py) as a TFDS data set:
images are stored as their encoded bytes (PNG/JPEG as found; decoded at read time, where bad
ones are counted), conversations and prompts as JSON text. It is read back with random access
through `builder.as_data_source(split)`; `TfdsSource` turns each example into a record again.
TensorFlow is not needed: only `file_format="array_record"` and `as_data_source` are used.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from neo_jax.data.records import KINDS, error_record

VERSION = "1.0.0"
# builder class name per kind; TFDS names the data set directory after it (snake_case)
_BUILDER_NAMES = {
  "caption": "neo_captions",
  "conversation": "neo_conversations",
  "preference": "neo_preferences",
  "text": "neo_text",
}


@functools.cache
def _tfds():
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  return tfds


def _features(kind: str):
  tfds = _tfds()
  f = tfds.features
  text = lambda: f.Text()
  common = {"id": text(), "error": text()}
  if kind != "text":
    common["images"] = f.Sequence(f.Tensor(shape=(), dtype=np.object_))
  per_kind = {
    "caption": {"caption": text()},
    "conversation": {"conversations": text(), "system": text()},
    "preference": {"prompt": text(), "chosen": text(), "rejected": text()},
    "text": {"text": text()},
  }[kind]
  return f.FeaturesDict({**common, **per_kind})


def _read_image_bytes(image) -> tuple[bytes | None, str]:
  """(bytes, "") or (None, error) for a path / bytes image entry."""
  if isinstance(image, (bytes, bytearray)):
    return bytes(image), ""
  try:
    with open(image, "rb") as f:
      return f.read(), ""
  except FileNotFoundError:
    return None, f"missing_file: image file not found: {image}"
  except OSError as e:
    return None, f"corrupt_image: cannot read {image}: {e}"


def record_to_example(record: Mapping, kind: str, key: str) -> dict:
  """A record -> TFDS example dict; problems known now go into `error` (kept, not dropped)."""
  error = record.get("error", "") or ""
  example = {"id": str(record.get("id", key)), "error": ""}
  if record.get("kind") != kind and not error:
    error = f"wrong_kind: {record.get('kind')!r} record in a {kind} data set"
  if kind != "text":
    images = []
    for im in record.get("images", []) or []:
      data, err = _read_image_bytes(im)
      if err and not error:
        error = err
      images.append(data or b"")
    example["images"] = images
  fields = {
    "caption": ("caption",),
    "conversation": ("conversations", "system"),
    "preference": ("prompt", "chosen", "rejected"),
    "text": ("text",),
  }[kind]
  for name in fields:
    value = record.get(name, "")
    if isinstance(value, (list, dict)):
      value = json.dumps(value, ensure_ascii=False)
    example[name] = value if isinstance(value, str) else ("" if value is None else str(value))
  example["error"] = error
  return example


@functools.cache
def _base_builder():
  tfds = _tfds()

  class NeoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the records given at construction (`splits`: name -> records function)."""

    VERSION = tfds.core.Version(VERSION)
    KIND = ""

    # Data sets defined in code, not in a TFDS package directory: no checksums or metadata
    # files to look up (the lookup would also import `importlib_resources`, which TFDS does
    # not declare as a dependency).
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def __init__(
      self,
      *,
      splits: Mapping[str, Callable[[], Iterable[Mapping]]] | None = None,
      description: str = "",
      **kwargs,
    ):
      self._splits = dict(splits or {})
      self._description = description
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self, description=self._description, features=_features(self.KIND)
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {name: self._generate_examples(make) for name, make in self._splits.items()}

    def _generate_examples(self, make):
      for i, record in enumerate(make()):
        key = f"{i:09d}"
        yield key, record_to_example(record, self.KIND, key)

  return NeoBuilder


@functools.cache
def builder_class(kind: str):
  """The GeneratorBasedBuilder subclass for one record kind (created lazily: TFDS import)."""
  if kind not in KINDS:
    raise ValueError(f"unknown record kind {kind!r}; one of {KINDS}")
  name = _BUILDER_NAMES[kind]
  camel = "".join(p.title() for p in name.split("_"))
  return type(camel, (_base_builder(),), {"__module__": __name__, "name": name, "KIND": kind})


def build_tfds(
  kind: str,
  name: str,
  splits: Mapping[str, Callable[[], Iterable[Mapping]]],
  data_dir: str | os.PathLike,
  description: str = "",
) -> pathlib.Path:
  """Builds (once) a TFDS array_record data set of `kind` records; returns its directory.

  `name` becomes the builder config (e.g. "easy_vqa" or the user's data set name); each split
  is a function returning an iterable of records.
  """
  tfds = _tfds()
  cls = builder_class(kind)
  builder = cls(
    splits=splits,
    description=description,
    data_dir=os.fspath(data_dir),
    config=tfds.core.BuilderConfig(name=name, version=VERSION),
    file_format="array_record",
  )
  builder.download_and_prepare()
  return pathlib.Path(builder.data_dir)


def built_dir(kind: str, name: str, data_dir: str | os.PathLike) -> pathlib.Path:
  """Where `build_tfds(kind, name, ..., data_dir)` puts (or has put) the data set."""
  return pathlib.Path(data_dir) / _BUILDER_NAMES[kind] / name / VERSION


def is_built(directory: str | os.PathLike) -> bool:
  return (pathlib.Path(directory) / "dataset_info.json").exists()


def kind_of_features(features: Iterable[str]) -> str:
  keys = set(features)
  for kind, field in (
    ("preference", "chosen"),
    ("conversation", "conversations"),
    ("caption", "caption"),
    ("text", "text"),
  ):
    if field in keys:
      return kind
  raise ValueError(f"not a neo_jax TFDS data set (features {sorted(keys)})")


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_to_record(example: Mapping, kind: str) -> dict:
  """A TFDS example (as `as_data_source` returns it) -> record."""
  record_id = _text(example.get("id", b""))
  error = _text(example.get("error", b""))
  if error:
    return {"kind": "error", "error": error, "id": record_id}
  record = {"kind": kind, "id": record_id}
  if kind != "text":
    record["images"] = [bytes(b) for b in example.get("images", [])]
  try:
    if kind == "caption":
      record["caption"] = _text(example["caption"])
    elif kind == "conversation":
      record["conversations"] = json.loads(_text(example["conversations"]))
      record["system"] = _text(example.get("system", b""))
    elif kind == "preference":
      record["prompt"] = json.loads(_text(example["prompt"]))
      record["chosen"] = _text(example["chosen"])
      record["rejected"] = _text(example["rejected"])
    else:
      record["text"] = _text(example["text"])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    return error_record("invalid_json", f"{record_id}: {e}", record_id)
  return record


class TfdsSource:
  """Random-access records from a built data set directory (the one holding
  dataset_info.json) and a split. Picklable: workers reopen the data source."""

  def __init__(self, directory: str | os.PathLike, split: str = "train"):
    self.directory = pathlib.Path(directory)
    if not is_built(self.directory):
      raise FileNotFoundError(f"no TFDS data set (dataset_info.json) in {self.directory}")
    self.split = split
    self._source = None
    builder = self._builder()
    if split not in builder.info.splits:
      raise ValueError(f"{self.directory}: no split {split!r} (has {list(builder.info.splits)})")
    self.kind = kind_of_features(builder.info.features.keys())
    self._len = builder.info.splits[split].num_examples

  def _builder(self):
    return _tfds().builder_from_directory(os.fspath(self.directory))

  def _data_source(self):
    if self._source is None:
      self._source = self._builder().as_data_source(split=self.split)
    return self._source

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    return example_to_record(self._data_source()[int(index)], self.kind)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __repr__(self) -> str:
    return f"TfdsSource({str(self.directory)!r}, split={self.split!r}, {self._len} {self.kind})"
