"""The training data pipeline: sources -> encode -> pack -> fixed-shape numpy batches.

    cfg = DataConfig(kind="sft", sources=("easy_vqa/vqa",), seq_len=1024, visual_budget=256,
                     batch_size=4, seed=0)
    it = build_train_iterator(cfg, load_tokenizer(), model_config,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
    batch = next(it)          # dict of numpy arrays, shapes from cfg (packing.PackingConfig)
    it.stats()                # skipped / dropped counts per reason, samples, tokens, ...

Determinism: every order comes from `seed` (each source is shuffled with a per-epoch seed;
mixing is a fixed interleave by weight; `augment` draws from a generator per sample, seeded by
`seed` and the sample's index), so the same config gives the same batches. With
`num_workers > 0` batches are made in grain worker processes, each packing its own slice:
still deterministic, but different from `num_workers = 0`.

Sharding: each process reads only its slice `[process_index::process_count]` of every
source's shuffled epoch; over one epoch the processes' examples are disjoint and complete.

Checkpointing: the iterator is a grain `DatasetIterator`; save it with orbax as
`ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))` and restore with
`grain.checkpoint.CheckpointRestore(it)` (exact resume, skip counters included).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.data import embedded
from neo_jax.data.augment import parse_augment
from neo_jax.data.encode import ACCEPTED, SampleEncoder
from neo_jax.data.jsonl import JsonlSource
from neo_jax.data.packing import (
  STATS_KEY,
  PackedBatchIterator,
  PackedBatchIterDataset,
  PackingConfig,
)
from neo_jax.data.stats import STAT_KEYS, summarize
from neo_jax.data.template import render_text
from neo_jax.data.tfds_sources import TfdsSource, is_built
from neo_jax.data.tokenizer import NeoTokenizer
from neo_jax.errors import UserError

KINDS = tuple(ACCEPTED)  # "sft", "pretrain", "text", "preference"

# what the short source name "easy_vqa" means for each pipeline kind
_EASY_VQA_FOR_KIND = {
  "sft": "easy_vqa/vqa",
  "pretrain": "easy_vqa/captions",
  "preference": "easy_vqa/preference",
}
# the source used when DataConfig.sources is empty
DEFAULT_SOURCES = {**_EASY_VQA_FOR_KIND, "text": "pydoc/text"}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything that decides the batches (and nothing about the model).

  sources: source specs, mixed by `weights` (default equal); empty: DEFAULT_SOURCES[kind]
    "easy_vqa"                       the embedded set that fits `kind` (vqa / captions /
                                     preference pairs); or name one: "easy_vqa/vqa",
                                     "easy_vqa/captions", "easy_vqa/preference", "pydoc/text",
                                     or one family of the vqa questions:
                                     "easy_vqa/vqa_{color,shape,yes_no_color,yes_no_shape}"
    "tfds:DIR" or DIR                a data set built by neo_jax.data.tfds_sources (the
                                     directory holding dataset_info.json); uses `split`
    "jsonl:FILE[@IMAGE_DIR]" or FILE a .jsonl (or LLaVA .json array) file; images relative
                                     to IMAGE_DIR (default: the file's directory)
  text_ratio: fraction of samples drawn from `text_sources` (plain-text LM data).
  """

  kind: str = "sft"  # "sft" | "pretrain" | "preference" | "text"
  sources: tuple[str, ...] = ()
  weights: tuple[float, ...] | None = None
  split: str = "train"
  text_sources: tuple[str, ...] = ("pydoc/text",)
  text_ratio: float = 0.0
  seq_len: int = 1024  # L, tokens per row
  visual_budget: int = 256  # N, visual tokens per row
  loss_token_budget: int | None = None  # K, supervised positions per row (None: no cap)
  batch_size: int = 1  # rows per process
  min_pixels: int | None = None  # None: the model config's
  max_pixels: int | None = None
  loss_reduction: str = "square"  # "square" (NEO) | "token"
  system_prompt: str = ""
  seed: int = 0
  num_epochs: int | None = None  # None: repeat forever
  strict: bool = False  # raise on the first bad input instead of skipping it
  augment: tuple[str, ...] = ()  # training images: "flip", "shift:F" (neo_jax.data.augment)
  num_workers: int = 0  # grain worker processes (0: packing in this process)
  read_threads: int = 2  # threads decoding / tokenising ahead of the packer
  worker_buffer_size: int = 2  # batches each worker prepares ahead

  def __post_init__(self):
    checks = [
      (self.kind in KINDS, f"kind={self.kind!r} is not one of {KINDS}"),
      (
        self.weights is None or len(self.weights) == len(self.resolved_sources()),
        f"weights {self.weights} do not match sources {self.resolved_sources()}",
      ),
      (self.weights is None or all(w > 0 for w in self.weights), "weights must be > 0"),
      (0.0 <= self.text_ratio < 1.0, f"text_ratio={self.text_ratio} must be in [0, 1)"),
      (
        not (self.kind in ("preference", "text") and self.text_ratio > 0),
        f"text_ratio must be 0 for {self.kind!r} data",
      ),
      (bool(self.text_sources) or self.text_ratio == 0, "text_ratio > 0 needs text_sources"),
      (self.num_workers >= 0 and self.read_threads >= 0, "num_workers / read_threads < 0"),
      (self.num_epochs is None or self.num_epochs >= 1, "num_epochs must be >= 1 or None"),
    ]
    for ok, message in checks:
      if not ok:
        raise UserError(f"DataConfig: {message}")
    try:
      parse_augment(self.augment)
    except ValueError as e:
      raise UserError(f"DataConfig: {e}") from None

  def resolved_sources(self) -> tuple[str, ...]:
    return tuple(self.sources) or (DEFAULT_SOURCES.get(self.kind, "easy_vqa"),)

  def packing_config(self, tokenizer: NeoTokenizer) -> PackingConfig:
    return PackingConfig(
      batch_size=self.batch_size,
      seq_len=self.seq_len,
      visual_budget=self.visual_budget,
      img_context_id=tokenizer.img_context_id,
      img_start_id=tokenizer.img_start_id,
      pad_id=tokenizer.pad_id,
      loss_token_budget=self.loss_token_budget,
      loss_reduction=self.loss_reduction,
      preference=self.kind == "preference",
    )

  def pixel_range(self, model_config: NeoConfig) -> tuple[int, int]:
    lo = self.min_pixels if self.min_pixels is not None else model_config.min_pixels
    hi = self.max_pixels if self.max_pixels is not None else model_config.max_pixels
    if not 0 < lo <= hi:
      raise UserError(f"DataConfig: need 0 < min_pixels <= max_pixels, got {lo}, {hi}")
    return lo, hi


def batch_shapes(cfg: DataConfig, tokenizer: NeoTokenizer) -> dict[str, tuple[tuple, np.dtype]]:
  """key -> (shape, dtype) of the batches `build_train_iterator(cfg, ...)` yields."""
  return cfg.packing_config(tokenizer).batch_shapes()


def resolve_source(spec: str, kind: str, split: str = "train"):
  """A random-access source of records for one spec string (see DataConfig.sources)."""
  if spec == "easy_vqa":
    if kind not in _EASY_VQA_FOR_KIND:
      raise UserError(f"source 'easy_vqa' has no {kind!r} data; use 'pydoc/text' for text")
    spec = _EASY_VQA_FOR_KIND[kind]
  if spec == "pydoc":
    spec = "pydoc/text"
  if spec in embedded.DATASETS:
    return embedded.embedded_source(spec, split)
  if spec.startswith("tfds:"):
    return TfdsSource(spec[len("tfds:") :], split)
  if spec.startswith("jsonl:"):
    path, _, image_root = spec[len("jsonl:") :].partition("@")
    return JsonlSource(path, image_root or None)
  if os.path.isdir(spec):
    if not is_built(spec):
      raise UserError(
        f"source {spec!r}: directory has no dataset_info.json (not a built TFDS data set)"
      )
    return TfdsSource(spec, split)
  if os.path.isfile(spec):
    return JsonlSource(spec)
  raise UserError(
    f"source {spec!r}: not an embedded data set ({sorted(embedded.DATASETS)}), "
    "a tfds:DIR, a jsonl:FILE, or an existing file / directory"
  )


def _seed_for(seed: int, index: int) -> int:
  return (seed * 1_000_003 + 7919 * index) % 2**32


def _shard(
  source, seed: int, process_index: int, process_count: int, num_epochs: int | None
) -> grain.MapDataset:
  """Shuffled per epoch (per-epoch seeds), then this process's slice, then repeated."""
  if len(source) == 0:
    raise UserError(f"source {source!r} is empty")
  if len(source) < process_count:
    raise UserError(
      f"source {source!r} has {len(source)} records, fewer than {process_count} processes"
    )
  ds = grain.MapDataset.source(source).shuffle(seed=seed)
  ds = ds[process_index::process_count]
  return ds.repeat(num_epochs)


def build_sample_dataset(
  cfg: DataConfig,
  tokenizer: NeoTokenizer,
  model_config: NeoConfig,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """MapDataset of encoded samples (or skip markers) for this process, before packing."""
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index={process_index} not in [0, process_count={process_count})")
  specs = list(cfg.resolved_sources())
  weights = list(cfg.weights or [1.0] * len(specs))
  if cfg.text_ratio > 0:
    total = sum(weights)
    weights = [w / total * (1 - cfg.text_ratio) for w in weights]
    weights += [cfg.text_ratio / len(cfg.text_sources)] * len(cfg.text_sources)
    specs += list(cfg.text_sources)
  parts = [
    _shard(
      resolve_source(spec, cfg.kind, cfg.split),
      _seed_for(cfg.seed, i),
      process_index,
      process_count,
      cfg.num_epochs,
    )
    for i, spec in enumerate(specs)
  ]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  lo, hi = cfg.pixel_range(model_config)
  augment = parse_augment(cfg.augment)
  encoder = SampleEncoder(
    tokenizer, cfg.kind, lo, hi, system=cfg.system_prompt, strict=cfg.strict, augment=augment
  )
  if not augment:
    return ds.map(encoder)
  # grain seeds each sample's generator from this seed and the sample's index
  return ds.random_map(encoder, seed=_seed_for(cfg.seed, len(specs) + process_index))


class DataIterator(grain.DatasetIterator):
  """Iterator of packed batches; sums the per-batch skip / drop / packing counters.

  `stats()` -> {"skipped/<reason>": n, "dropped/<reason>": n, "samples": n, "rows": n,
  "batches": n, "tokens": n, "visual_tokens": n, "loss_tokens": n, "text_chunks": n}.
  The counters are part of the state, so they survive a checkpoint restore.
  """

  def __init__(self, parent: grain.DatasetIterator, packing: PackingConfig):
    super().__init__(parent)
    self.packing = packing
    self._counts = np.zeros(len(STAT_KEYS), np.int64)

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._parent)
    except StopIteration:
      self._collect_unreported()
      raise
    delta = batch.pop(STATS_KEY, None)
    if delta is not None:
      self._counts += np.asarray(delta, np.int64)
    return batch

  def _collect_unreported(self) -> None:
    """Counts of a stream that ended with skips only (e.g. all records bad): no batch carried
    them. Reachable when packing runs in this process (num_workers = 0)."""
    stack = [self._parent]
    while stack:
      node = stack.pop()
      if isinstance(node, PackedBatchIterator):
        self._counts += node.unreported
        node.unreported[:] = 0
      stack.extend(getattr(node, "_parents", ()))

  def stats(self) -> dict[str, int]:
    return {k: int(v) for k, v in zip(STAT_KEYS, self._counts)}

  def summary(self) -> str:
    return summarize(self.stats())

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": _jsonable(self._parent.get_state()), "stats": self.stats()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    counts = state.get("stats", {})
    self._counts = np.asarray([int(counts.get(k, 0)) for k in STAT_KEYS], np.int64)

  def __str__(self) -> str:
    return "DataIterator"


def _jsonable(x: Any) -> Any:
  """numpy scalars inside a grain state -> Python numbers (orbax writes the state as JSON)."""
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def _mark_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside absl.app.run they must be marked parsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def build_train_iterator(
  cfg: DataConfig,
  tokenizer: NeoTokenizer,
  model_config: NeoConfig,
  process_index: int = 0,
  process_count: int = 1,
) -> DataIterator:
  """The checkpointable iterator of fixed-shape numpy batches for this process."""
  for name, ours, theirs in (
    ("<IMG_CONTEXT>", tokenizer.img_context_id, model_config.img_context_token_id),
    ("<img>", tokenizer.img_start_id, model_config.img_start_token_id),
  ):
    if ours != theirs:
      raise UserError(f"tokenizer id of {name} is {ours}, the model config says {theirs}")
  packing = cfg.packing_config(tokenizer)
  samples = build_sample_dataset(cfg, tokenizer, model_config, process_index, process_count)
  read = grain.ReadOptions(
    num_threads=cfg.read_threads, prefetch_buffer_size=max(4 * cfg.read_threads, 8)
  )
  ds = PackedBatchIterDataset(samples.to_iter_dataset(read), packing)
  if cfg.num_workers > 0:
    _mark_flags_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size
      )
    )
  return DataIterator(iter(ds), packing)


def read_vqa_eval(split: str = "test", limit: int | None = None) -> list[embedded.VqaExample]:
  """easy-vqa questions (PNG image, question, answer) for VQA accuracy; test split by default."""
  return embedded.read_vqa_eval(split, limit)


def describe_batch(
  batch: dict[str, np.ndarray],
  tokenizer: NeoTokenizer,
  rows: Sequence[int] = (0,),
  max_chars: int = 2000,
) -> str:
  """Human-readable rows: each segment's text with supervised tokens (those whose prediction
  is trained) in [[...]], image runs collapsed, preference branches marked, budget use."""
  lines = []
  ids, seg, w = batch["input_ids"], batch["segment_ids"], batch["loss_weights"]
  branch = batch.get("branch_ids")
  marks = {0: "", 1: "chosen: ", 2: " | rejected: "}
  for r in rows:
    n_tokens = int((seg[r] > 0).sum())
    n_visual = int((ids[r] == tokenizer.img_context_id).sum())
    n_loss = (
      int((batch["gather_weights"][r] > 0).sum())
      if "gather_weights" in batch
      else int((w[r] > 0).sum())
    )
    lines.append(
      f"row {r}: {int(seg[r].max())} segments, {n_tokens}/{ids.shape[1]} tokens, "
      f"{n_visual}/{batch['pixels'].shape[1]} visual tokens, {n_loss} loss positions"
    )
    for s in range(1, int(seg[r].max()) + 1):
      idx = np.nonzero(seg[r] == s)[0]
      if branch is not None:  # response tokens are the supervised ones
        labels = branch[r, idx]
      else:  # token j is supervised when position j - 1 carries weight
        labels = np.zeros(len(idx), np.int32)
        labels[1:] = w[r, idx[:-1]] > 0
      parts, run, label = [], [], None
      for t, lab in list(zip(ids[r, idx], labels)) + [(None, None)]:
        if run and lab != label:
          piece = render_text(tokenizer, run)
          if branch is not None and label:
            parts.append(f"{marks[int(label)]}[[{piece}]]")
          else:
            parts.append(f"[[{piece}]]" if label else piece)
          run = []
        if t is not None:
          run.append(int(t))
          label = lab
      body = "".join(parts)
      if len(body) > max_chars:
        body = body[:max_chars] + f"... ({len(body) - max_chars} more characters)"
      lines.append(f"  segment {s} ({len(idx)} tokens): {body!r}")
  return "\n".join(lines)
