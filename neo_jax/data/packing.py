"""Packing samples into fixed-shape batches (the batch contract of docs/architecture.md).

Each of the B rows of a batch has three budgets: L tokens, N visual tokens and, optionally,
K loss tokens (supervised positions). Samples are placed first-fit into the rows of the batch
being filled; the first sample that fits no row closes the batch and opens the next one. A
sample that cannot fit even an empty row is dropped and counted (an image is never split);
plain text samples are the exception: they are cut into row-sized pieces (consecutive pieces
overlap by one token so every token after the first is predicted once).

Batch (numpy, fixed shapes):

    input_ids     int32 [B, L]          pad: <|endoftext|>
    targets       int32 [B, L]          token that position i predicts (input_ids[i + 1] in its
                                        sample; in preference rows the next token of the same
                                        branch, the chosen one after the prompt)
    loss_weights  float32 [B, L]        weight of predicting targets[i]; "square": each
                                        supervised token of a sample weighs 1/sqrt(#supervised
                                        of that sample), "token": 1. Preference rows: the chosen
                                        response only (an optional SFT term)
    segment_ids   int32 [B, L]          1.. per sample, 0 = padding
    positions     int32 [B, 3, L]       Native-RoPE T/H/W (neo_jax.positions)
    pixels        uint8 [B, N, 4, 768]  visual tokens in <IMG_CONTEXT> order, zero padding
    pixel_rc      int32 [B, N, 2]       (row, col) of each visual token on its image's grid
    branch_ids    int32 [B, L]          preference only: 0 prompt, 1 chosen, 2 rejected

The loss-token budget K caps the supervised positions (nonzero loss_weights) of a row, so a
step that gathers only K positions per row before the vocabulary projection never overflows.

A preference pair is one segment laid out prompt | chosen | rejected; branch_ids are 1 / 2
exactly on the response tokens (each ending with its supervised "<|im_end|>\\n"). The first
rejected token is predicted from the last prompt token (the rejected branch does not see the
chosen one), which no dense per-position target can express, so preference batches also list
every response token with the position whose logits predict it (K = the loss-token budget,
or L when unset; K caps the response tokens of a row):

    gather_index    int32 [B, K]    position whose logits predict the response token
    gather_targets  int32 [B, K]    the response token
    gather_weights  float32 [B, K]  1, 0 = padding slot
    gather_segment  int32 [B, K]    its pair (segment id), 0 = padding
    gather_branch   int32 [B, K]    1 chosen, 2 rejected, 0 = padding

The iterator state is the parent's state before the sample that opens the next batch (plus an
offset into it for a cut text sample), so save/restore resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import numpy as np

from neo_jax.data.encode import is_skip
from neo_jax.data.image import PATCH_DIM
from neo_jax.data.stats import (
  DROP_REASONS,
  SKIP_REASONS,
  STAT_INDEX,
  STAT_KEYS,
  DataError,
  report_drop,
)
from neo_jax.positions import native_rope_positions

STATS_KEY = "_stats"  # per-batch int64 [len(STAT_KEYS)] deltas; the pipeline iterator pops it
LOSS_REDUCTIONS = ("square", "token")
_N_BAD = len(SKIP_REASONS) + len(DROP_REASONS)  # STAT_KEYS starts with skip, then drop counts


@dataclasses.dataclass(frozen=True)
class PackingConfig:
  batch_size: int  # rows per batch (B)
  seq_len: int  # tokens per row (L)
  visual_budget: int  # visual tokens per row (N)
  img_context_id: int
  img_start_id: int
  pad_id: int
  loss_token_budget: int | None = None  # supervised positions per row (K)
  loss_reduction: str = "square"
  preference: bool = False
  # consecutive skipped / dropped records after which the data is declared unusable (an
  # endless stream of only bad records would otherwise never yield a batch)
  max_consecutive_bad: int = 10_000

  def __post_init__(self):
    if self.batch_size < 1 or self.seq_len < 2 or self.visual_budget < 0:
      raise ValueError(
        f"packing: need batch_size >= 1, seq_len >= 2, visual_budget >= 0 "
        f"(got {self.batch_size}, {self.seq_len}, {self.visual_budget})"
      )
    if self.loss_token_budget is not None and self.loss_token_budget < 1:
      raise ValueError(f"packing: loss_token_budget must be >= 1, got {self.loss_token_budget}")
    if self.loss_reduction not in LOSS_REDUCTIONS:
      raise ValueError(f"packing: loss_reduction {self.loss_reduction!r} not in {LOSS_REDUCTIONS}")

  @property
  def gather_size(self) -> int | None:
    """K of the gather_* keys (preference batches only), else None."""
    if not self.preference:
      return None
    return self.loss_token_budget if self.loss_token_budget is not None else self.seq_len

  def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of every batch entry (fixed for a config)."""
    b, l, n = self.batch_size, self.seq_len, self.visual_budget
    shapes = {
      "input_ids": ((b, l), np.int32),
      "targets": ((b, l), np.int32),
      "loss_weights": ((b, l), np.float32),
      "segment_ids": ((b, l), np.int32),
      "positions": ((b, 3, l), np.int32),
      "pixels": ((b, n, 4, PATCH_DIM), np.uint8),
      "pixel_rc": ((b, n, 2), np.int32),
    }
    if self.preference:
      shapes["branch_ids"] = ((b, l), np.int32)
    k = self.gather_size
    if k is not None:
      shapes.update(
        {
          "gather_index": ((b, k), np.int32),
          "gather_targets": ((b, k), np.int32),
          "gather_weights": ((b, k), np.float32),
          "gather_segment": ((b, k), np.int32),
          "gather_branch": ((b, k), np.int32),
        }
      )
    return {key: (shape, np.dtype(dtype)) for key, (shape, dtype) in shapes.items()}


@dataclasses.dataclass
class _Piece:
  """A sample (or a piece of a cut text sample) with its loss bookkeeping."""

  ids: np.ndarray  # int32 [n]
  targets: np.ndarray  # int32 [n]
  weights: np.ndarray  # float32 [n]
  branch: np.ndarray | None  # int32 [n]
  pixels: np.ndarray  # uint8 [v, 4, 768]
  rc: np.ndarray  # int32 [v, 2]
  loss_pos: np.ndarray  # int32 [m] position predicting each loss token
  loss_tgt: np.ndarray  # int32 [m]
  loss_w: np.ndarray  # float32 [m]
  loss_branch: np.ndarray  # int32 [m]

  @property
  def n_tokens(self) -> int:
    return int(self.ids.shape[0])

  @property
  def n_visual(self) -> int:
    return int(self.pixels.shape[0])

  @property
  def n_loss(self) -> int:
    return int(self.loss_pos.shape[0])


def _reduction_weight(count: int, reduction: str) -> float:
  if count == 0:
    return 0.0
  return 1.0 / math.sqrt(count) if reduction == "square" else 1.0


def make_piece(
  ids: np.ndarray,
  supervised: np.ndarray,
  pixels: np.ndarray,
  rc: np.ndarray,
  branch: np.ndarray | None,
  cfg: PackingConfig,
) -> _Piece:
  """Targets, weights and loss positions of one segment."""
  ids = np.asarray(ids, np.int32)
  supervised = np.asarray(supervised, bool)
  n = ids.shape[0]
  targets = np.full(n, cfg.pad_id, np.int32)
  targets[:-1] = ids[1:]
  weights = np.zeros(n, np.float32)
  if branch is None:
    pos = np.nonzero(supervised[1:])[0].astype(np.int32)
    w = _reduction_weight(len(pos), cfg.loss_reduction)
    weights[pos] = w
    return _Piece(
      ids,
      targets,
      weights,
      None,
      pixels,
      rc,
      pos,
      ids[pos + 1],
      np.full(len(pos), w, np.float32),
      np.zeros(len(pos), np.int32),
    )
  branch = np.asarray(branch, np.int32)
  n_prompt = int(np.sum(branch == 0))
  if n_prompt == 0 or np.any(branch[:n_prompt] != 0) or np.any(np.diff(branch) < 0):
    raise ValueError("preference sample must be laid out prompt | chosen | rejected")
  # next token of the same branch; the chosen response continues the prompt
  ends = np.nonzero(branch[:-1] != branch[1:])[0]
  for e in ends:
    if branch[e] == 1:  # last chosen token: the next one belongs to the rejected branch
      targets[e] = cfg.pad_id
  resp = np.nonzero((branch > 0) & supervised)[0].astype(np.int32)
  resp = resp[resp > 0]
  pred = resp - 1
  jump = branch[pred] != branch[resp]  # first token of a branch
  pred = np.where(jump, n_prompt - 1, pred).astype(np.int32)
  chosen = branch[resp] == 1
  w = _reduction_weight(int(chosen.sum()), cfg.loss_reduction)
  weights[pred[chosen]] = w
  return _Piece(
    ids,
    targets,
    weights,
    branch,
    pixels,
    rc,
    pred,
    ids[resp],
    np.ones(len(resp), np.float32),
    branch[resp],
  )


def _fits_fresh_row(tokens: int, visual: int, loss: int, cfg: PackingConfig) -> str | None:
  """None, or the drop reason of a piece that exceeds an empty row."""
  if tokens > cfg.seq_len:
    return "too_many_tokens"
  if visual > cfg.visual_budget:
    return "too_many_visual_tokens"
  k = cfg.loss_token_budget
  if k is not None and loss > k:
    return "too_many_loss_tokens"
  return None


def _drop_detail(sample: dict, reason: str, cfg: PackingConfig) -> str:
  """Which sample, and how far over an empty row's budget it is."""
  name = str(sample.get("id") or "a sample without an id")
  if reason == "too_many_tokens":
    what = f"{len(sample['input_ids'])} tokens > data.seq_len {cfg.seq_len}"
  elif reason == "too_many_visual_tokens":
    what = f"{len(sample['pixels'])} visual tokens > data.visual_budget {cfg.visual_budget}"
  else:
    what = (
      f"{int(np.count_nonzero(sample['supervised'][1:]))} supervised tokens > the "
      f"loss-token budget {cfg.loss_token_budget}"
    )
  return f"{name}: {what}"


def _text_piece_end(supervised: np.ndarray, offset: int, cfg: PackingConfig) -> int:
  """End (exclusive) of the longest text piece from `offset` that fits an empty row."""
  end = min(len(supervised), offset + cfg.seq_len)
  k = cfg.loss_token_budget
  if k is not None:
    # loss positions of piece [offset, e) are offset <= i < e - 1 with supervised[i + 1]
    loss_cum = np.cumsum(supervised[offset + 1 : end])
    over = np.nonzero(loss_cum > k)[0]
    if len(over):
      end = offset + 1 + int(over[0])  # piece [offset, end) has exactly k loss positions
  return end


class _Row:
  def __init__(self):
    self.pieces: list[_Piece] = []
    self.tokens = self.visual = self.loss = 0

  def fits(self, p: _Piece, cfg: PackingConfig) -> bool:
    k = cfg.loss_token_budget
    return (
      self.tokens + p.n_tokens <= cfg.seq_len
      and self.visual + p.n_visual <= cfg.visual_budget
      and (k is None or self.loss + p.n_loss <= k)
    )

  def add(self, p: _Piece) -> None:
    self.pieces.append(p)
    self.tokens += p.n_tokens
    self.visual += p.n_visual
    self.loss += p.n_loss


def assemble_batch(rows: list[list[_Piece]], cfg: PackingConfig) -> dict[str, np.ndarray]:
  """Fixed-shape batch arrays from the pieces of each row (rows may be empty)."""
  shapes = cfg.batch_shapes()
  out = {
    key: np.zeros(shape, dtype) for key, (shape, dtype) in shapes.items() if key != "positions"
  }
  out["input_ids"][:] = cfg.pad_id
  out["targets"][:] = cfg.pad_id
  k = cfg.gather_size
  for r, pieces in enumerate(rows):
    t = v = g = 0
    for seg, p in enumerate(pieces, start=1):
      n, nv, m = p.n_tokens, p.n_visual, p.n_loss
      out["input_ids"][r, t : t + n] = p.ids
      out["targets"][r, t : t + n] = p.targets
      out["loss_weights"][r, t : t + n] = p.weights
      out["segment_ids"][r, t : t + n] = seg
      if cfg.preference:
        out["branch_ids"][r, t : t + n] = p.branch
      if nv:
        out["pixels"][r, v : v + nv] = p.pixels
        out["pixel_rc"][r, v : v + nv] = p.rc
      if k is not None and m:
        out["gather_index"][r, g : g + m] = p.loss_pos + t
        out["gather_targets"][r, g : g + m] = p.loss_tgt
        out["gather_weights"][r, g : g + m] = p.loss_w
        out["gather_segment"][r, g : g + m] = seg
        out["gather_branch"][r, g : g + m] = p.loss_branch
      t, v, g = t + n, v + nv, g + m
  out["positions"] = native_rope_positions(
    out["input_ids"],
    out["segment_ids"],
    out["pixel_rc"],
    out["branch_ids"] if cfg.preference else None,
    img_context_id=cfg.img_context_id,
    img_start_id=cfg.img_start_id,
  )
  return out


class PackedBatchIterDataset(grain.IterDataset):
  """IterDataset of packed batches from an IterDataset of samples / skip markers."""

  def __init__(self, parent: grain.IterDataset, config: PackingConfig):
    super().__init__(parent)
    self._config = config

  def __iter__(self) -> PackedBatchIterator:
    return PackedBatchIterator(self._parent.__iter__(), self._config)

  def __str__(self) -> str:
    return f"PackedBatchIterDataset({self._config})"


class PackedBatchIterator(grain.DatasetIterator):
  """First-fit packing into the B rows of one batch at a time; see the module docstring."""

  def __init__(self, parent: grain.DatasetIterator, config: PackingConfig):
    super().__init__(parent)
    self._cfg = config
    # (sample, offset, parent state before the sample) carried into the next batch
    self._pending: tuple[dict, int, Any] | None = None
    self._resume_offset = 0
    # counts seen after the last batch when the stream ends with no usable sample left (no
    # batch carries them); the pipeline iterator collects them when it runs in-process
    self.unreported = np.zeros(len(STAT_KEYS), np.int64)
    self._consecutive_bad = 0

  # --- state ---------------------------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    if self._pending is not None:
      _, offset, parent_state = self._pending
      return {"parent": parent_state, "offset": int(offset)}
    return {"parent": self._parent.get_state(), "offset": int(self._resume_offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = None
    self._resume_offset = int(state.get("offset", 0))

  # --- packing -------------------------------------------------------------------------------
  def _next_sample(self, delta: np.ndarray) -> tuple[dict, int, Any] | None:
    """The next usable (sample, offset, state), counting skip markers; None at the end."""
    if self._pending is not None:
      item, self._pending = self._pending, None
      return item
    while True:
      state = self._parent.get_state()
      try:
        sample = next(self._parent)
      except StopIteration:
        return None
      if is_skip(sample):
        delta[STAT_INDEX[f"skipped/{sample['skip']}"]] += 1
        self._count_bad(delta)
        continue
      offset, self._resume_offset = self._resume_offset, 0
      return sample, offset, state

  def _piece(self, sample: dict, offset: int) -> tuple[_Piece | None, int | None, str | None]:
    """(piece, offset of the rest or None, drop reason or None)."""
    cfg = self._cfg
    ids, sup = sample["input_ids"], sample["supervised"]
    branch = sample.get("branch_ids") if cfg.preference else None
    if cfg.preference and branch is None:
      return None, None, "too_many_tokens"  # unreachable: the encoder only emits pairs here
    if bool(sample.get("splittable", False)) and len(sample["pixels"]) == 0 and branch is None:
      end = _text_piece_end(sup, offset, cfg)
      if end - offset < 2:
        return None, None, "too_many_loss_tokens"
      piece = make_piece(
        ids[offset:end], sup[offset:end], sample["pixels"], sample["pixel_rc"], None, cfg
      )
      rest = end - 1 if end < len(ids) else None
      return piece, rest, None
    n_loss_upper = int(np.count_nonzero(sup[1:]))
    reason = _fits_fresh_row(len(ids), len(sample["pixels"]), n_loss_upper, cfg)
    if reason is not None:
      return None, None, reason
    return make_piece(ids, sup, sample["pixels"], sample["pixel_rc"], branch, cfg), None, None

  def __next__(self) -> dict[str, np.ndarray]:
    cfg = self._cfg
    rows = [_Row() for _ in range(cfg.batch_size)]
    delta = np.zeros(len(STAT_KEYS), np.int64)
    while True:
      item = self._next_sample(delta)
      if item is None:
        break
      sample, offset, state = item
      piece, rest, reason = self._piece(sample, offset)
      if reason is not None:
        report_drop(reason, _drop_detail(sample, reason, cfg))
        delta[STAT_INDEX[f"dropped/{reason}"]] += 1
        self._count_bad(delta)
        continue
      self._consecutive_bad = 0
      row = next((r for r in rows if r.fits(piece, cfg)), None)
      if row is None:
        self._pending = (sample, offset, state)
        break
      row.add(piece)
      delta[STAT_INDEX["samples" if offset == 0 else "text_chunks"]] += 1
      delta[STAT_INDEX["tokens"]] += piece.n_tokens
      delta[STAT_INDEX["visual_tokens"]] += piece.n_visual
      delta[STAT_INDEX["loss_tokens"]] += piece.n_loss
      if rest is not None:
        self._pending = (sample, rest, state)
    used = [r for r in rows if r.pieces]
    if not used:
      self.unreported += delta
      raise StopIteration
    delta[STAT_INDEX["rows"]] += len(used)
    delta[STAT_INDEX["batches"]] += 1
    batch = assemble_batch([r.pieces for r in rows], cfg)
    batch[STATS_KEY] = delta
    return batch

  def _count_bad(self, delta: np.ndarray) -> None:
    self._consecutive_bad += 1
    if self._consecutive_bad > self._cfg.max_consecutive_bad:
      counts = {k: int(v) for k, v in zip(STAT_KEYS[:_N_BAD], delta[:_N_BAD]) if v}
      raise DataError(
        f"no usable sample in the last {self._cfg.max_consecutive_bad} records "
        f"(this batch so far: {counts}); check the sources, the pipeline kind "
        "and the row budgets"
      )

  def __str__(self) -> str:
    return "PackedBatchIterator"
