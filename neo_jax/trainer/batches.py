"""Batches for the trainer from `config.data`: the grain pipeline of neo_jax.data, or synthetic
ones (next-token rows, or preference pairs when `data.kind` is "preference").

Both yield this process's rows of the global batch as numpy arrays following the batch
contract: the rows of the batch shards its devices hold (a `BatchLayout`,
neo_jax/parallel/layout.py; processes of one data group read the same stream), and expose
`get_state()` / `set_state()` (exact resume) and `stats()` (skip / drop counters for the
metrics). The global batch is `config.data.batch_size` rows per update, or, when that is 0,
`data.rows_per_shard` rows for each batch shard of each micro-batch (`global_rows`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from neo_jax.config import NeoConfig
from neo_jax.data.embedded import load_named_tokenizer
from neo_jax.data.pipeline import DataConfig, build_train_iterator
from neo_jax.data.synthetic import SyntheticIterator, SyntheticSpec
from neo_jax.data.synthetic_pairs import PairIterator, PairSpec
from neo_jax.errors import UserError
from neo_jax.inference.loading import check_tokenizer
from neo_jax.parallel.layout import BatchLayout


def global_rows(config: ml_collections.ConfigDict, shards: int) -> int:
  """Rows per update over all processes: data.batch_size, or when it is 0, data.rows_per_shard
  x the mesh's batch shards (data x fsdp) x grad_accum_steps."""
  d = config.data
  if d.batch_size > 0:
    return d.batch_size
  if d.get("rows_per_shard", 0) <= 0:
    raise UserError("config: set data.batch_size (rows per update) or data.rows_per_shard")
  return d.rows_per_shard * shards * config.grad_accum_steps


def default_layout(config: ml_collections.ConfigDict) -> BatchLayout:
  """The layout without a mesh: one batch shard per process."""
  return BatchLayout.by_process(global_rows(config, jax.process_count()))


def _pixel_tokens(model_config: NeoConfig) -> tuple[int, int]:
  """Visual tokens of the smallest and largest image the model's pixel range allows."""
  side = model_config.token_pixels**2
  return (max(1, model_config.min_pixels // side), max(1, model_config.max_pixels // side))


def _synthetic_seed(config: ml_collections.ConfigDict, split: str) -> int:
  return config.data.seed + (0 if split == "train" else 1_000_003)


def synthetic_iterator(
  config: ml_collections.ConfigDict,
  model_config: NeoConfig,
  split: str = "train",
  layout: BatchLayout | None = None,
) -> SyntheticIterator | PairIterator:
  """Random batches of the config's shapes: packed next-token rows (each a function of its
  global row index, so any layout gives the same global batch), or preference pairs (one
  stream per data group)."""
  layout = layout or default_layout(config)
  if config.data.kind == "preference":
    spec = PairSpec.for_model(
      model_config,
      batch_size=layout.local_rows,
      seq_len=config.data.seq_len,
      visual_tokens=config.data.visual_budget,
      gather_size=config.loss.positions_per_row,
      pairs_per_row=max(1, config.loss.positions_per_row // 2),
      seed=_synthetic_seed(config, split) + 7_919 * layout.group,
    )
    return PairIterator(spec)
  lo, hi = _pixel_tokens(model_config)
  hi = min(hi, config.data.visual_budget)
  spec = SyntheticSpec.for_model(
    model_config,
    batch_size=layout.local_rows,
    seq_len=config.data.seq_len,
    visual_tokens=config.data.visual_budget,
    min_image_tokens=min(lo, hi),
    max_image_tokens=hi,
    text_vocab=min(model_config.vocab_size - 8, 4096),
    seed=_synthetic_seed(config, split),
    row_ids=tuple(int(r) for r in layout.row_ids()),
  )
  return SyntheticIterator(spec)


def data_config(
  config: ml_collections.ConfigDict,
  model_config: NeoConfig,
  split: str = "train",
  layout: BatchLayout | None = None,
  **changes: Any,
) -> DataConfig:
  """neo_jax.data.DataConfig from `config.data` (this process's rows, K = loss budget) and the
  model's pixel range."""
  layout = layout or default_layout(config)
  d = config.data
  k = config.loss.positions_per_row
  fields = dict(
    kind=d.kind,
    sources=tuple(d.sources),
    weights=tuple(d.weights) or None,
    split=split,
    text_sources=tuple(d.text_sources),
    text_ratio=d.text_ratio,
    seq_len=d.seq_len,
    visual_budget=d.visual_budget,
    loss_token_budget=k if k > 0 else None,
    batch_size=layout.local_rows,
    min_pixels=model_config.min_pixels,
    max_pixels=model_config.max_pixels,
    loss_reduction=d.loss_reduction,
    system_prompt=d.system_prompt,
    seed=d.seed,
    strict=d.strict,
    augment=tuple(d.augment) if split == "train" else (),  # held-out data as it is
    num_workers=d.num_workers,
    read_threads=d.read_threads,
  )
  fields.update(changes)
  return DataConfig(**fields)


def make_iterator(
  config: ml_collections.ConfigDict,
  model_config: NeoConfig,
  split: str = "train",
  layout: BatchLayout | None = None,
  **changes: Any,
) -> Iterator[dict]:
  """The data iterator a config asks for (`data.pipeline`: grain | synthetic), feeding this
  process's rows of `layout` (default: one batch shard per process)."""
  layout = layout or default_layout(config)
  if config.data.pipeline == "synthetic":  # `changes` name DataConfig fields: no effect here
    return synthetic_iterator(config, model_config, split, layout)
  tokenizer = load_named_tokenizer(config.data.tokenizer)
  check_tokenizer(tokenizer, model_config, f"config.data.tokenizer={config.data.tokenizer!r}")
  return build_train_iterator(
    data_config(config, model_config, split, layout, **changes),
    tokenizer,
    model_config,
    process_index=layout.group,
    process_count=layout.groups,
  )


def iterator_stats(iterator: Any) -> dict[str, float]:
  """The iterator's cumulative counters (skipped / dropped samples, ...), if it keeps any."""
  stats = getattr(iterator, "stats", None)
  return {f"data/{k}": float(v) for k, v in (stats() if callable(stats) else {}).items()}
