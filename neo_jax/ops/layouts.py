"""Packed-row layouts (segment, image and branch ids) for kernel tests and benchmarks.

A row is a list of samples; a sample is a list of spans (text or one image) with a branch id
(0 shared, 1 chosen, 2 rejected). Rows built here satisfy the preconditions of
`masks.kv_ranges`: segments, branch runs and images are contiguous spans, image ids are unique
within a segment, and a preference sample is [prompt | chosen | rejected].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from neo_jax.ops.masks import AttnIds


@dataclasses.dataclass(frozen=True)
class Span:
  length: int
  image: bool = False
  branch: int = 0


Sample = Sequence[Span]


def row_ids(samples: Sequence[Sample], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(segment_ids, image_ids, branch_ids), each int32 [length]; the tail is padding."""
  seg = np.zeros(length, np.int32)
  img = np.zeros(length, np.int32)
  branch = np.zeros(length, np.int32)
  pos = 0
  for s, sample in enumerate(samples, start=1):
    next_image = 1
    for span in sample:
      end = pos + span.length
      if end > length:
        raise ValueError(f"row_ids: samples need more than {length} tokens")
      seg[pos:end] = s
      branch[pos:end] = span.branch
      if span.image:
        img[pos:end] = next_image
        next_image += 1
      pos = end
  return seg, img, branch


def sample_length(sample: Sample) -> int:
  return sum(span.length for span in sample)


def random_sample(
  rng: np.random.Generator,
  budget: int,
  *,
  max_images: int = 3,
  image_len: tuple[int, int] = (1, 12),
  text_len: tuple[int, int] = (1, 10),
  preference_prob: float = 0.3,
) -> list[Span]:
  """One sample of at most `budget` tokens: text and images, sometimes a preference pair."""
  spans: list[Span] = []
  used = 0

  def add(span: Span) -> bool:
    nonlocal used
    if used + span.length > budget:
      return False
    spans.append(span)
    used += span.length
    return True

  for _ in range(int(rng.integers(0, max_images + 1))):
    if rng.random() < 0.7:  # text between images, sometimes none (adjacent images)
      add(Span(int(rng.integers(*text_len))))
    add(Span(int(rng.integers(*image_len)), image=True))
  add(Span(int(rng.integers(*text_len))))
  if rng.random() < preference_prob:
    for branch in (1, 2):
      if rng.random() < 0.2:  # an image inside a response
        add(Span(int(rng.integers(*image_len)), image=True, branch=branch))
      add(Span(int(rng.integers(*text_len)), branch=branch))
  if not spans:  # budget smaller than the shortest text span
    spans.append(Span(1))
  return spans


def random_row(
  rng: np.random.Generator, length: int, *, max_samples: int = 4, pad_prob: float = 0.5, **sample_kw
) -> list[list[Span]]:
  """Samples packed into `length` tokens, optionally leaving padding at the end."""
  samples = []
  used = 0
  for _ in range(int(rng.integers(1, max_samples + 1))):
    budget = length - used
    if budget <= 0:
      break
    sample = random_sample(rng, budget, **sample_kw)
    samples.append(sample)
    used += sample_length(sample)
  if rng.random() >= pad_prob and used < length:  # fill the rest with one more text sample
    samples.append([Span(length - used)])
  return samples


def random_batch(
  rng: np.random.Generator, batch: int, length: int, **row_kw
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(segment_ids, image_ids, branch_ids), each int32 [batch, length]."""
  rows = [row_ids(random_row(rng, length, **row_kw), length) for _ in range(batch)]
  return tuple(np.stack(x) for x in zip(*rows))


def neo_row(
  rng: np.random.Generator,
  length: int,
  *,
  image_len: tuple[int, int] = (1024, 3072),
  prompt_len: tuple[int, int] = (8, 32),
  answer_len: tuple[int, int] = (100, 1000),
  preference: bool = False,
  pad_to_full: bool = False,
) -> list[list[Span]]:
  """NEO-like samples: a short prompt, one 1-3k-token image, then text; packed into a row.

  With `preference`, the text after the image is split into a chosen and a rejected answer.
  """
  samples = []
  used = 0
  while True:
    sample = [Span(int(rng.integers(*prompt_len))), Span(int(rng.integers(*image_len)), image=True)]
    if preference:
      sample += [Span(int(rng.integers(*prompt_len)))]
      sample += [
        Span(int(rng.integers(*answer_len)), branch=1),
        Span(int(rng.integers(*answer_len)), branch=2),
      ]
    else:
      sample += [Span(int(rng.integers(*answer_len)))]
    n = sample_length(sample)
    if used + n > length:
      break
    samples.append(sample)
    used += n
  if not samples:  # a single truncated sample
    image = min(int(rng.integers(*image_len)), length // 2)
    samples = [[Span(8), Span(image, image=True), Span(length - image - 8)]]
    used = length
  if pad_to_full and used < length:
    samples.append([Span(length - used)])
  return samples


def text_row(
  rng: np.random.Generator, length: int, *, sample_len: tuple[int, int] = (100, 2000)
) -> list[list[Span]]:
  """Text-only samples (SFT conversations) packed into a row until the next does not fit."""
  samples, used = [], 0
  while True:
    n = int(rng.integers(*sample_len))
    if used + n > length:
      break
    samples.append([Span(n)])
    used += n
  return samples or [[Span(length)]]


def describe(samples: Sequence[Sample]) -> str:
  """Short text form of a row, e.g. 't12 i1024 t300 | t8 i2048 t99 b1:t50 b2:t40'."""

  def span(s: Span) -> str:
    prefix = f"b{s.branch}:" if s.branch else ""
    return f"{prefix}{'i' if s.image else 't'}{s.length}"

  return " | ".join(" ".join(span(s) for s in sample) for sample in samples)


def ids_from_arrays(
  segment_ids: np.ndarray, image_ids: np.ndarray, branch_ids: np.ndarray | None = None
) -> AttnIds:
  """AttnIds (jax arrays) for a self-attention batch."""
  branch = None if branch_ids is None else jnp.asarray(branch_ids, jnp.int32)
  return AttnIds(
    jnp.asarray(segment_ids, jnp.int32), jnp.asarray(image_ids, jnp.int32), branch, None
  )
