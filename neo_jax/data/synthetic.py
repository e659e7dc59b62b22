"""Random packed batches that follow the batch contract (docs/architecture.md).

Used by tests, benchmarks and configs with `data.source = "synthetic"`. Each packed sample is
`text <img> <IMG_CONTEXT> x (h*w) </img> question answer <eos>`; the image is a flat colour
whose class decides the answer token, so a model can learn it (loss falls) while shapes,
visual tokens, positions, segment ids and NEO's square loss weights are all realistic.
Batches are a pure function of (seed, step, row), so the iterator state is the step number
and resume is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.positions import grid_rc, native_rope_positions


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  batch_size: int  # rows per process
  seq_len: int  # L
  visual_tokens: int  # N: visual-token budget per row
  img_context_id: int
  img_start_id: int
  img_end_id: int
  eos_id: int
  pad_id: int
  patch_dim: int = 768
  sub_patches: int = 4
  text_vocab: int = 256  # text tokens are drawn from [num_classes + 4, text_vocab)
  num_classes: int = 8
  min_image_tokens: int = 4
  max_image_tokens: int = 16
  seed: int = 0
  num_processes: int = 1
  process_index: int = 0
  # global row index of each row this process makes (default: the process's block,
  # process_index * batch_size + 0 .. batch_size - 1)
  row_ids: tuple[int, ...] | None = None

  @classmethod
  def for_model(cls, config: NeoConfig, **fields) -> SyntheticSpec:
    return cls(
      img_context_id=config.img_context_token_id,
      img_start_id=config.img_start_token_id,
      img_end_id=config.img_end_token_id,
      eos_id=config.eos_token_id,
      pad_id=config.pad_token_id,
      patch_dim=config.patch_dim,
      sub_patches=config.merge_size**2,
      **fields,
    )


def compact_vocab(config: NeoConfig, vocab_size: int) -> NeoConfig:
  """`config` with a small vocabulary whose last ids are the special tokens (fast tests and
  benchmarks of everything but the embedding size)."""
  top = vocab_size - 1
  return config.replace(
    vocab_size=vocab_size,
    img_context_token_id=top,
    img_start_token_id=top - 1,
    img_end_token_id=top - 2,
    eos_token_id=top - 3,
    pad_token_id=top - 4,
  )


def _grid(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[int, int]:
  while True:
    h, w = (int(x) for x in rng.integers(1, spec.max_image_tokens + 1, size=2))
    if spec.min_image_tokens <= h * w <= spec.max_image_tokens:
      return h, w


def _sample(rng: np.random.Generator, spec: SyntheticSpec):
  """(ids, supervised mask, visual rc [n, 2], pixels [n, sub, patch_dim]) of one sample."""
  h, w = _grid(rng, spec)
  cls = int(rng.integers(spec.num_classes))
  low = spec.num_classes + 4
  prompt = rng.integers(low, spec.text_vocab, size=int(rng.integers(1, 6))).tolist()
  question = [spec.num_classes, spec.num_classes + 1, spec.num_classes + 2]
  answer = [cls, spec.eos_id]
  ids = (
    prompt
    + [spec.img_start_id]
    + [spec.img_context_id] * (h * w)
    + [spec.img_end_id]
    + question
    + answer
  )
  supervised = [False] * (len(ids) - len(answer)) + [True] * len(answer)
  level = int(255 * cls / max(spec.num_classes - 1, 1))
  noise = rng.integers(-8, 9, size=(h * w, spec.sub_patches, spec.patch_dim))
  pixels = np.clip(level + noise, 0, 255).astype(np.uint8)
  return ids, supervised, grid_rc(h, w), pixels


def synthetic_row(rng: np.random.Generator, spec: SyntheticSpec) -> dict[str, np.ndarray]:
  """One packed row: samples are added until the next would exceed L tokens or N visuals."""
  L, N = spec.seq_len, spec.visual_tokens
  ids, seg, sup, rcs, pix = [], [], [], [], []
  n_visual = 0
  for _ in range(64):
    s_ids, s_sup, s_rc, s_pix = _sample(rng, spec)
    if len(ids) + len(s_ids) > L or n_visual + len(s_rc) > N:
      break
    segment = (seg[-1] if seg else 0) + 1
    ids += s_ids
    sup += s_sup
    seg += [segment] * len(s_ids)
    rcs.append(s_rc)
    pix.append(s_pix)
    n_visual += len(s_rc)
  pad = L - len(ids)
  ids_l = np.asarray(ids + [spec.pad_id] * pad, np.int32)
  seg_l = np.asarray(seg + [0] * pad, np.int32)
  sup_l = np.asarray(sup + [False] * pad)
  rc = np.zeros((N, 2), np.int32)
  pixels = np.zeros((N, spec.sub_patches, spec.patch_dim), np.uint8)
  if rcs:
    rc[:n_visual] = np.concatenate(rcs)
    pixels[:n_visual] = np.concatenate(pix)

  # position i predicts token i + 1 of the same sample; supervised answer tokens weigh
  # 1/sqrt(number of supervised tokens of their sample) (NEO's "square" reduction)
  same_next = np.zeros(L, bool)
  same_next[:-1] = (seg_l[1:] == seg_l[:-1]) & (seg_l[:-1] != 0)
  targets = np.zeros(L, np.int32)
  targets[:-1] = ids_l[1:]
  predicts_supervised = np.zeros(L, bool)
  predicts_supervised[:-1] = sup_l[1:]
  predicts_supervised &= same_next
  weights = np.zeros(L, np.float32)
  for s in np.unique(seg_l[seg_l != 0]):
    where = predicts_supervised & (seg_l == s)
    if where.any():
      weights[where] = 1.0 / np.sqrt(where.sum())
  targets = np.where(same_next, targets, 0)
  positions = native_rope_positions(
    ids_l, seg_l, rc, img_context_id=spec.img_context_id, img_start_id=spec.img_start_id
  )
  return dict(
    input_ids=ids_l,
    targets=targets,
    loss_weights=weights,
    segment_ids=seg_l,
    positions=positions,
    pixels=pixels,
    pixel_rc=rc,
  )


def synthetic_batch(spec: SyntheticSpec, step: int) -> dict[str, np.ndarray]:
  """This process's rows of global batch `step` (row r of the global batch is a function of
  (seed, step, r) alone)."""
  first = spec.process_index * spec.batch_size
  ids = spec.row_ids if spec.row_ids is not None else range(first, first + spec.batch_size)
  if len(ids) != spec.batch_size:
    raise ValueError(f"{len(ids)} row ids for a batch of {spec.batch_size} rows")
  rows = [synthetic_row(np.random.default_rng([spec.seed, step, r]), spec) for r in ids]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class SyntheticIterator(Iterator[dict]):
  """Endless synthetic batches with `get_state` / `set_state` (exact resume)."""

  def __init__(self, spec: SyntheticSpec, step: int = 0):
    self.spec = spec
    self.step = step

  def __next__(self) -> dict[str, np.ndarray]:
    batch = synthetic_batch(self.spec, self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.step, "seed": self.spec.seed}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])

  def stats(self) -> dict[str, int]:
    """Counters like the grain pipeline's (synthetic data skips nothing)."""
    return {"batches": self.step}
