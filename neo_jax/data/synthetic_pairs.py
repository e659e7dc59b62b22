"""Random preference batches that follow the batch contract (tests, benchmarks).

Each pair is `text <img> <IMG_CONTEXT> x (h*w) </img> question` | chosen | rejected, with the
chosen answer the class token that the image's flat colour encodes and the rejected one another
class (both followed by <eos>), packed by the real packer (neo_jax/data/packing.py) so that
branch ids, restarted positions and the gather_* lists are exactly what the pipeline makes. A
model can learn the preference, so margins move within a few steps. Batches are a pure function
of (seed, step), so the iterator's state is the step number and resume is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.data.packing import PackingConfig, assemble_batch, make_piece
from neo_jax.positions import grid_rc


@dataclasses.dataclass(frozen=True)
class PairSpec:
  batch_size: int  # rows
  seq_len: int  # L
  visual_tokens: int  # N per row
  gather_size: int  # K per row
  pairs_per_row: int
  img_context_id: int
  img_start_id: int
  img_end_id: int
  eos_id: int
  pad_id: int
  num_classes: int = 8
  text_vocab: int = 256
  max_image_tokens: int = 6
  max_answer_tokens: int = 3  # responses of 1..this many tokens (then <eos>)
  seed: int = 0

  @classmethod
  def for_model(cls, config: NeoConfig, **fields: Any) -> PairSpec:
    return cls(
      img_context_id=config.img_context_token_id,
      img_start_id=config.img_start_token_id,
      img_end_id=config.img_end_token_id,
      eos_id=config.eos_token_id,
      pad_id=config.pad_token_id,
      **fields,
    )

  def packing(self) -> PackingConfig:
    return PackingConfig(
      batch_size=self.batch_size,
      seq_len=self.seq_len,
      visual_budget=self.visual_tokens,
      img_context_id=self.img_context_id,
      img_start_id=self.img_start_id,
      pad_id=self.pad_id,
      loss_token_budget=self.gather_size,
      loss_reduction="token",
      preference=True,
    )


def random_pair(rng: np.random.Generator, spec: PairSpec) -> dict[str, np.ndarray]:
  """One pair: ids / supervised / branch_ids [n], pixels [v, 4, 768], pixel_rc [v, 2], and
  the lengths of its prompt, chosen and rejected parts."""
  h = int(rng.integers(1, 3))
  w = int(rng.integers(1, max(2, spec.max_image_tokens // h + 1)))
  cls = int(rng.integers(spec.num_classes))
  other = int((cls + rng.integers(1, spec.num_classes)) % spec.num_classes)
  low = spec.num_classes + 4
  text = lambda n: rng.integers(low, spec.text_vocab, size=n).tolist()
  prompt = (
    text(int(rng.integers(1, 5)))
    + [spec.img_start_id]
    + [spec.img_context_id] * (h * w)
    + [spec.img_end_id]
    + text(2)
  )
  answer = lambda c: [c] + text(int(rng.integers(0, spec.max_answer_tokens))) + [spec.eos_id]
  chosen, rejected = answer(cls), answer(other)
  ids = np.asarray(prompt + chosen + rejected, np.int32)
  branch = np.asarray([0] * len(prompt) + [1] * len(chosen) + [2] * len(rejected), np.int32)
  level = int(255 * cls / max(spec.num_classes - 1, 1))
  noise = rng.integers(-8, 9, size=(h * w, 4, 768))
  return {
    "input_ids": ids,
    "supervised": branch > 0,
    "branch_ids": branch,
    "pixels": np.clip(level + noise, 0, 255).astype(np.uint8),
    "pixel_rc": grid_rc(h, w).astype(np.int32),
    "lengths": np.asarray([len(prompt), len(chosen), len(rejected)]),
  }


def pack_pairs(rows: list[list[dict]], spec: PairSpec) -> dict[str, np.ndarray]:
  """A batch from `rows` of pairs (each row's pairs must fit L, N and K)."""
  cfg = spec.packing()
  pieces = [
    [
      make_piece(p["input_ids"], p["supervised"], p["pixels"], p["pixel_rc"], p["branch_ids"], cfg)
      for p in row
    ]
    for row in rows
  ]
  return assemble_batch(pieces, cfg)


def random_rows(rng: np.random.Generator, spec: PairSpec) -> list[list[dict]]:
  """B rows of up to `pairs_per_row` random pairs, stopping a row when the next would not fit."""
  rows = []
  for _ in range(spec.batch_size):
    row, tokens, visual, loss = [], 0, 0, 0
    for _ in range(spec.pairs_per_row):
      p = random_pair(rng, spec)
      n, v, k = len(p["input_ids"]), len(p["pixels"]), int(p["lengths"][1:].sum())
      if (
        tokens + n > spec.seq_len or visual + v > spec.visual_tokens or loss + k > spec.gather_size
      ):
        break
      row.append(p)
      tokens, visual, loss = tokens + n, visual + v, loss + k
    rows.append(row)
  return rows


class PairIterator:
  """Endless deterministic preference batches; state = the step number."""

  def __init__(self, spec: PairSpec, start: int = 0):
    self.spec = spec
    self.step = start

  def __iter__(self) -> PairIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.spec.seed, self.step])
    self.step += 1
    return pack_pairs(random_rows(rng, self.spec), self.spec)

  def get_state(self) -> dict[str, int]:
    return {"step": self.step}

  def set_state(self, state: dict | None) -> None:
    self.step = int((state or {}).get("step", 0))
